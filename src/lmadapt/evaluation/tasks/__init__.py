"""The built-in evaluation tasks, one module each. Importing this package imports every module in this
folder, and each registers its task (:func:`lmadapt.evaluation.registry.register_task`)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
