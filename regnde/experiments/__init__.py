"""Experiments of the papers regnde implements, as a resumable command-line runner.

``regnde run EXPERIMENT --regularizer NAME --backend NAME`` trains and evaluates one experiment
(see :mod:`regnde.experiments.runner`); ``regnde report DIR...`` turns run directories into the
papers' tables (:mod:`regnde.experiments.report`). Experiments register by name and backend
(:mod:`regnde.experiments.base`); regularizer names and coefficient schedules are in
:mod:`regnde.experiments.specs`; data loaders in :mod:`regnde.experiments.data`.

This package is the torch side of regnde and imports torch; the library core does not.
"""

#: What ``regnde demo`` (:mod:`regnde.experiments.demo`, a torch experiment) needs, and the install
#: line that brings it; the command line checks these before importing the demo.
DEMO_NEEDS = ("torch", "torchdiffeq", "sklearn", "tqdm", "matplotlib")
DEMO_INSTALL = 'pip install "regnde[torch,experiments]"'
