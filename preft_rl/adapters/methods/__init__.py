"""The registry of adapter methods: each method (LoRA, LoReFT, DiReFT, or one registered by a user) is one
AdapterMethod object that the rest of the library asks instead of comparing method names (see base.py)."""

from .base import (
    METHOD_FIELDS,
    AdapterMethod,
    BuiltModule,
    attach_after_layer,
    get_method,
    is_adapter_parameter,
    method_names,
    register_method,
    unregister_method,
)
from .lora import LoraMethod
from .reft import DiReftMethod, LoReftMethod

for _method in (LoraMethod(), LoReftMethod(), DiReftMethod()):
    register_method(_method, replace=True)

__all__ = [
    "METHOD_FIELDS",
    "AdapterMethod",
    "BuiltModule",
    "attach_after_layer",
    "get_method",
    "is_adapter_parameter",
    "method_names",
    "register_method",
    "unregister_method",
]
