"""tinymnist: tiny CNNs that reach 99.4% on MNIST with fewer than 8,000 parameters."""

from . import runtime as _runtime

# Before torch loads: OpenMP threads spin briefly then sleep, and freed memory stays in the heap (see runtime.py for
# the measurements behind both). A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT or MALLOC_* settings win.
_runtime.apply()

__version__ = "0.1.0"

# The public API for notebooks: names that live in the modules, re-exported here and imported on first use,
# so that `import tinymnist` stays light and the policies above are in place before torch loads.
_API = {
    "load_mnist": "data",  # the four MNIST arrays as uint8 tensors, downloaded and verified if needed
    "list_models": "model", "create_model": "model",  # the registry of Model_1, Model_2, ...
    "register_model": "model",  # class decorator: your own nn.Module class, by name, in this process
    "load_models_file": "usermodels",  # your model.py: its nn.Module classes (and those it skipped, with why)
    "summarize": "summary", "format_summary": "summary",  # shapes, parameters, receptive field, MACs
    "STEPS": "experiments", "get_step": "experiments",  # the series; each step's .config is its recipe
    "answer": "experiments",  # the series' answer: the smallest step whose 5-seed check passes
    "TrainConfig": "config", "override": "config",  # a recipe, and a copy of one with fields replaced
    "train_run": "runs",  # train a recipe into a run directory; returns (run_dir, history)
    "resume_run": "runs",  # continue a stopped run from its last finished epoch; returns (run_dir, history)
    "load_checkpoint": "runs",  # a run's model.pt -> (model, recipe)
    "plot_curves": "plots",  # a history's loss and accuracy curves as a PNG
    "run_check": "check",  # train a step over seeds and judge the target
    "run_errors": "mistakes",  # a checkpoint's misclassified grid, confusion matrix and errors.json
    "plot_proof": "mistakes",  # a check's accuracy per epoch for every seed, with the threshold
    "pass_rate_bound": "target",  # the one-sided 95% Clopper-Pearson lower bound on a run's pass rate
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'tinymnist' has no attribute {name!r}")


def __dir__():
    return __all__
