"""Registers TuckA with the installed, unmodified peft.

peft's ``register_peft_method`` wants a member of its ``PeftType`` enum, and the stdlib offers no way to add a
member to an existing Enum. We add one by hand (a dozen lines, no fork): a real ``PeftType`` member, so that peft
code reading ``peft_type.value`` or comparing with ``PeftType.X`` works, and so that ``adapter_config.json`` holds
``"peft_type": "TUCKA"`` and reloads through ``PeftModel.from_pretrained`` once ``tucka_llm`` is imported.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType, register_peft_method


def _add_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


TUCKA_PEFT_TYPE = _add_peft_type("TUCKA")


def register_tucka(config_cls: type, model_cls: type) -> None:
    """Make peft's get_peft_model / PeftModel.from_pretrained know TuckA (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if TUCKA_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name="tucka", config_cls=config_cls, model_cls=model_cls, prefix="tucka_")
