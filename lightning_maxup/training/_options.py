"""``MaxUpMixin.maxup_<name>``: a typed property per field of the module's ``MaxUpConfig``."""

from __future__ import annotations

import warnings
from typing import Any, Generic, TypeVar, cast, overload

__all__ = ["_Option"]

T = TypeVar("T")


class _Option(Generic[T]):
    """``self.maxup_<name>``: reads ``maxup_config.<name>``.

    Setting it is deprecated (one way to set each option): it warns, then validates and replaces the config, as
    ``self.maxup_config = self.maxup_config.replace(<name>=...)`` does.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"``maxup_config.{name}`` (set it through ``maxup_config``)."

    @overload
    def __get__(self, obj: None, owner: type) -> _Option[T]: ...

    @overload
    def __get__(self, obj: Any, owner: type) -> T: ...

    def __get__(self, obj: Any | None, owner: type) -> T | _Option[T]:
        if obj is None:
            return self
        return cast(T, getattr(obj.maxup_config, self.name))

    def __set__(self, obj: Any, value: T) -> None:
        warnings.warn(
            f"Setting `maxup_{self.name}` is deprecated; set"
            f" `module.maxup_config = module.maxup_config.replace({self.name}=...)` instead",
            DeprecationWarning,
            stacklevel=2,
        )
        obj.maxup_config = obj.maxup_config.replace(**{self.name: value})
