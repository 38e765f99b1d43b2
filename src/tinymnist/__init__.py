"""tinymnist: tiny CNNs that reach 99.4% on MNIST with fewer than 8,000 parameters."""

from .accel import runtime as _runtime

# The one thing `import tinymnist` does, and why here: the OpenMP wait policy and the heap's policy are read once,
# when torch (and its OpenMP runtime) first loads, so they are set before any module of the package imports torch:
# OpenMP threads spin briefly then sleep, and freed memory stays in the heap (accel/runtime.py has the measurements
# behind both). A user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT or MALLOC_* settings win. Nothing else runs on import.
_runtime.apply()

from .version import __version__  # noqa: E402

# The public API for notebooks: names that live in the modules, re-exported here and imported on first use,
# so that `import tinymnist` stays light and the policies above are in place before torch loads.
_API = {
    "load_mnist": "core.data",  # the four MNIST arrays as uint8 tensors, downloaded and verified if needed
    "list_models": "models.model", "create_model": "models.model",  # the registry of Model_1, Model_2, ...
    "register_model": "models.model",  # class decorator: your own nn.Module class, by name, in this process
    "load_models_file": "models.userfile",  # your model.py: its nn.Module classes (and those it skipped, with why)
    "summarize": "models.summary", "format_summary": "models.summary",  # shapes, parameters, receptive field, MACs
    "STEPS": "lab.series", "get_step": "lab.series",  # the series; each step's .config is its recipe
    "answer": "lab.series",  # the series' answer: the smallest reliable step (at least 19 of 20 seeds pass)
    "teacher_recipe": "lab.series",  # a distilled recipe's teacher, as a recipe: train_run(cfg, teacher=...)
    "TrainConfig": "core.config", "override": "core.config",  # a recipe, and a copy of one with fields replaced
    "train_run": "core.runs",  # train a recipe into a run directory; returns (run_dir, history)
    "resume_run": "core.runs",  # continue a stopped run from its last finished epoch; returns (run_dir, history)
    "load_checkpoint": "core.runs",  # a run's model.pt -> (model, recipe)
    "plot_curves": "core.curves",  # a history's loss and accuracy curves as a PNG
    "run_check": "lab.check",  # train a step over seeds and judge the target
    "run_errors": "apps.misclassified",  # a checkpoint's misclassified grid, confusion matrix and errors.json
    "plot_proof": "pages.plots",  # a check's accuracy per epoch for every seed, with the threshold
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
