"""One validation layer for every setting: run/train configs and each synthesizer's and objective's options.

Everything is a pydantic v2 model derived from :class:`Settings`: strict types (``true`` is not 1,
``"3"`` is not 3), unknown keys forbidden, defaults declared once on the model, frozen (copy with
:func:`retainfirst.config.with_changes`). A :class:`pydantic.ValidationError` never reaches the user:
it becomes one :class:`RetainFirstError` line naming the full dotted key and the valid choices or
range, e.g. ``config: train.lr=-1 must be > 0`` or
``config: unknown key 'train.stepz'; valid keys in train: steps, lr, ...``.

Validators follow one convention so messages compose: a *field* validator raises
``ValueError("<rule>")`` and the message becomes ``<key>=<value> <rule>``; a *model* validator
raises ``ValueError("<field>=<value> <rule>")`` naming the field itself, and the section path is
put in front. A validator that checks a free-form mapping against another model raises
:class:`NestedError` so the inner key path is kept (``train.lora.r=0 ...``).
"""

from __future__ import annotations

import contextvars
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from retainfirst.errors import RetainFirstError


def _integral(value: Any) -> Any:
    """YAML writes 1e2 for 100: a float with an integral value counts as that integer (2.5 does not)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _comma_list(value: Any) -> Any:
    """Override values of list fields: ``"sum,sago"`` -> ``["sum", "sago"]``, ``"8,4"`` -> ``[8, 4]``,
    and a lone scalar (``quantize_bits=4``) -> ``[4]``."""
    if isinstance(value, str):
        return [_scalar(part.strip()) for part in value.split(",") if part.strip()]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]
    return value


def _scalar(text: str) -> Any:
    """A comma-list item: an integer or a number when it reads as one, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Int = Annotated[int, BeforeValidator(_integral)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveInt = Annotated[Int, Field(ge=1)]
Float = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # [0, 1)
CommaList = BeforeValidator(_comma_list)
ListAsTuple = BeforeValidator(_list_to_tuple)


class NestedError(ValueError):
    """Raised by a validator that checked a value against another model; keeps that model's key path."""

    def __init__(self, error: ValidationError, model: type[BaseModel]) -> None:
        super().__init__(str(error).splitlines()[0])
        self.error = error
        self.model = model


def validate_nested(model: type[BaseModel], value: Any) -> BaseModel:
    """``model`` validated from ``value`` inside another validator (errors keep their key path)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise NestedError(exc, model) from None


_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("retainfirst_settings_depth", default=0)


class Settings(BaseModel):
    """Base of every validated settings model: strict, no unknown keys, frozen, one-line errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    error_prefix: ClassVar[str] = "config: "
    error_noun: ClassVar[str] = "key"  # "unknown key ..." / "unknown option ..."
    error_root: ClassVar[str] = ""  # the dotted key of a section built on its own (eval, data)

    def __init__(self, **data: Any) -> None:
        # pydantic calls this for nested sections too: only the outermost call translates the
        # error, so the message carries the full key path (train.lr, not lr).
        outermost = _DEPTH.get() == 0
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if not outermost:
                raise
            raise type(self).error(exc, root=type(self).error_root) from None
        finally:
            _DEPTH.reset(token)

    @classmethod
    def parse(cls, data: Any, *, prefix: str | None = None, root: str = "") -> Self:
        """Validate plain data (a mapping); ``root`` is the dotted key of this section in messages."""
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise cls.error(exc, prefix=prefix, root=root) from None
        finally:
            _DEPTH.reset(token)

    @classmethod
    def error(cls, exc: ValidationError, *, prefix: str | None = None, root: str = "") -> RetainFirstError:
        text, complete = describe_error(exc, cls, root)
        if not complete:
            text = f"{cls.error_prefix if prefix is None else prefix}{text}"
        return RetainFirstError(text)


class Options(Settings):
    """Base of a synthesizer's or objective's options model (``unknown option 'x'; valid options: ...``)."""

    error_noun: ClassVar[str] = "option"


def parse_options(owner: str, model: type[Options], values: Mapping[str, Any]) -> Options:
    """Validate keyword options of ``owner`` (e.g. ``"synthesizer 'sago'"``) against its options model."""
    return model.parse(dict(values), prefix=f"{owner}: ")


# ----------------------------------------------------------------------------------------------
# ValidationError -> one line


def join_key(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


def unknown_key(key: str, section: str, model: type[BaseModel], noun: str = "key") -> str:
    where = f" in {section}" if section else ""
    valid = ", ".join(model.model_fields) or "none"
    return f"unknown {noun} {key!r}; valid {noun}s{where}: {valid}"


def _flat_metadata(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(_flat_metadata(list(item.metadata)) if isinstance(item, FieldInfo) else [item])
    return out


def _unwrap(tp: Any, metadata: list[Any]) -> tuple[Any, list[Any], bool]:
    """Strip Annotated and Optional: (bare type, constraint metadata, whether None is allowed)."""
    optional = False
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp, *extra = typing.get_args(tp)
            metadata = [*metadata, *_flat_metadata(extra)]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(tp))
            if len(args) != 1:
                return typing.Union[tuple(args)], metadata, optional  # noqa: UP007 - built at runtime
            tp = args[0]
        else:
            return tp, metadata, optional


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def describe_type(tp: Any, optional: bool = False) -> str:
    tp, _, inner_optional = _unwrap(tp, [])
    origin = typing.get_origin(tp)
    if _is_model(tp):
        text = f"a mapping ({tp.__name__} keys)"
    elif origin is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(tp)))
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(describe_type(a) for a in typing.get_args(tp))
    elif origin in (list, tuple):
        text = "a list"
    elif origin in (dict, Mapping):
        text = "a mapping"
    else:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        text = names.get(tp, getattr(tp, "__name__", str(tp)))
    return text + (" or null" if optional or inner_optional else "")


_BOUNDS = {
    annotated_types.Ge: (">=", "ge", "["),
    annotated_types.Gt: (">", "gt", "("),
    annotated_types.Le: ("<=", "le", "]"),
    annotated_types.Lt: ("<", "lt", ")"),
}


def _range(tp: Any, metadata: list[Any], ctx: dict[str, Any]) -> str:
    """``> 0``, ``an integer >= 1``, ``in [0, 1)`` from the field's declared bounds."""
    bounds = [item for item in metadata if type(item) in _BOUNDS]
    if not bounds:  # a constraint pydantic reports only through the error context
        bounds = [cls(ctx[attr]) for cls, (_, attr, _) in _BOUNDS.items() if attr in ctx]
    lows = [b for b in bounds if isinstance(b, annotated_types.Ge | annotated_types.Gt)]
    highs = [b for b in bounds if isinstance(b, annotated_types.Le | annotated_types.Lt)]
    integer = "an integer " if tp is int else ""

    def parts(item: Any) -> tuple[str, Any, str]:
        symbol, attr, bracket = _BOUNDS[type(item)]
        return symbol, getattr(item, attr), bracket

    if lows and highs:
        (_, low, left), (_, high, right) = parts(lows[0]), parts(highs[0])
        return f"{integer}in {left}{low}, {high}{right}"
    symbol, limit, _ = parts((lows or highs)[0])
    return f"{integer}{symbol} {limit}"


def describe_error(exc: ValidationError, model: type[BaseModel], root: str = "") -> tuple[str, bool]:
    """The first error as (one line without prefix, whether it is already a complete message)."""
    return _describe(exc.errors(include_url=False)[0], model, root)


def _describe(err: Any, model: type[BaseModel], root: str) -> tuple[str, bool]:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    key, tp, metadata, optional = root, model, [], False
    section, owner = root, model
    for part in err["loc"]:
        tp, metadata, optional = _unwrap(tp, metadata)
        origin = typing.get_origin(tp)
        if _is_model(tp):
            section, owner = key, tp
            key = join_key(key, str(part))
            if part not in tp.model_fields:
                break
            field = tp.model_fields[part]
            tp, metadata = field.annotation, _flat_metadata(list(field.metadata))
        elif isinstance(part, int) and origin in (list, tuple):
            args = typing.get_args(tp)
            fixed = origin is tuple and args and args[-1] is not Ellipsis
            tp, metadata, key = (args[part] if fixed else args[0]) if args else Any, [], f"{key}[{part}]"
        elif origin in (dict, Mapping) and isinstance(part, str):
            tp, metadata, key = Any, [], join_key(key, part)
        else:  # a union member's tag: the error is about the value at ``key``
            break
    tp, metadata, inner_optional = _unwrap(tp, metadata)
    optional = optional or inner_optional
    if kind == "extra_forbidden":
        return unknown_key(key, section, owner, getattr(owner, "error_noun", "key")), False
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        if isinstance(error, NestedError):
            return _describe(error.error.errors(include_url=False)[0], error.model, key)
        if isinstance(error, RetainFirstError):
            return str(error), True
        text = str(error) if error is not None else err["msg"]
        if _is_model(tp):  # a model validator names its field itself
            return (join_key(key, text) if key else text), False
        return f"{key}={value!r} {text}", False
    if kind == "literal_error":
        rule = "is not valid; choose one of " + ", ".join(map(str, typing.get_args(tp)))
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        rule = "must be " + _range(tp, metadata, ctx)
    elif kind == "finite_number":
        rule = "must be a finite number"
    elif kind == "too_short" and ctx.get("min_length") == 1:
        rule = "must not be empty"
    elif kind in ("too_short", "too_long"):
        rule = f"must have {ctx.get('min_length', ctx.get('max_length'))} entries"
    elif kind == "missing":
        return f"{key} is required", False
    elif _is_model(tp) and not key:
        return f"the {model.__name__} must be a mapping, got {type(value).__name__}", False
    else:
        rule = "is invalid; expected " + describe_type(tp, optional)
    return f"{key}={value!r} {rule}", False
