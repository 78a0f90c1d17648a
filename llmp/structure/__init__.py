"""Discovery: which weight slices of a model must be removed together."""

from llmp.structure.adapters import adapter_for, register, supported_model_types
from llmp.structure.adapters.base import Adapter
from llmp.structure.groups import Group, Kind, Slice, Structure

__all__ = ["Adapter", "Group", "Kind", "Slice", "Structure", "adapter_for", "register", "supported_model_types"]
