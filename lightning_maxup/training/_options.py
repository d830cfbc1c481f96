"""``MaxUpMixin.maxup_<name>``: a typed property per field of the module's ``MaxUpConfig``."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast, overload

__all__ = ["_Option"]

T = TypeVar("T")


class _Option(Generic[T]):
    """``self.maxup_<name>``: reads ``maxup_config.<name>``; setting it validates and replaces the config."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"``maxup_config.{name}``; setting it validates and replaces the config."

    @overload
    def __get__(self, obj: None, owner: type) -> _Option[T]: ...

    @overload
    def __get__(self, obj: Any, owner: type) -> T: ...

    def __get__(self, obj: Any | None, owner: type) -> T | _Option[T]:
        if obj is None:
            return self
        return cast(T, getattr(obj.maxup_config, self.name))

    def __set__(self, obj: Any, value: T) -> None:
        obj.maxup_config = obj.maxup_config.replace(**{self.name: value})
