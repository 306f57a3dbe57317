"""Methods register themselves by name on import; importing this package makes all of them available."""

from lmadapt.methods import (  # noqa: F401  (registration)
    allora,
    balora,
    bottleneck,
    control_llm,
    corda,
    dora,
    freeze,
    full,
    ia3,
    lamda,
    lofit,
    lora,
    meteora,
    miss,
    new_tokens,
    nola,
    olora,
    pissa,
    prompt_tuning,
    spiel,
)
from lmadapt.methods.base import Method, ParamGroup, StepContext
from lmadapt.methods.registry import (
    available_methods,
    build_method,
    config_with_method,
    method_class,
    method_for_peft,
    method_problems,
    method_spec,
    register,
)

__all__ = [
    "Method", "ParamGroup", "StepContext", "available_methods", "build_method", "config_with_method", "method_class",
    "method_for_peft", "method_problems", "method_spec", "register",
]
