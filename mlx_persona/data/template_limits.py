"""Chat templates rendered with size limits: a template cannot build a value of more than ``MAX_SIZE``
characters (or items), so that ``{{ 'a' * (3 * 10**8) }}`` fails at once with a one-line error instead
of taking gigabytes (and the process) down with it.

transformers renders chat templates with jinja2's ``ImmutableSandboxedEnvironment``, built in
``transformers.utils.chat_template_utils._cached_compile_jinja_template`` with its own settings
(``trim_blocks``, ``lstrip_blocks``, its extensions, filters and globals). :func:`install` swaps that
class, in that module only, for :class:`BoundedEnvironment`, a subclass that transformers then builds
with the very same settings, so every template renders byte for byte as before. What it adds:

- ``*``, ``+``, ``%`` and ``**`` are intercepted (jinja2's ``intercepted_binops``), so they are also no
  longer folded at compile time (jinja2 computed ``'a' * 300000000`` while compiling), and checked
  before they run; so is ``~`` (through the code generator) and every method call and filter (by the
  size of its input, the widths or counts it is given, and its result);
- a value printed by ``{{ }}`` and the whole rendered text are checked the same way.

A value's size counts characters of strings plus items of lists and mappings, nested ones included
(computed once per object, so a list that holds itself many times is measured quickly and at its full
size). ``range()`` is capped by jinja2 itself (``MAX_RANGE``). Not bounded: the time of loops that
build nothing (``range`` nested in ``range``).
"""

from __future__ import annotations

import functools
import re

MAX_SIZE = 1 << 24  # characters (or items) in one value; a long conversation is well under a million
MAX_INT_BITS = 1 << 16
_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_FIELD_NUMBER = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)")


def _limit_error(what: str, size: int, number: bool = False):
    from jinja2.exceptions import SecurityError

    if number:
        return SecurityError(f"{what} was given {size:,}, over the limit of {MAX_SIZE:,}")
    return SecurityError(f"{what} of {size:,} characters or items is over the limit of {MAX_SIZE:,}")


def _bits_error(bits: int):
    from jinja2.exceptions import SecurityError

    return SecurityError(f"a number of {bits:,} bits is over the limit of {MAX_INT_BITS:,}")


def size_of(value, memo: dict | None = None, depth: int = 0) -> int:
    """Characters plus items of `value`, nested values included (stops counting past MAX_SIZE)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 3 + 1  # about its decimal digits
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 1
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    if depth > 64:
        return MAX_SIZE + 1
    total = len(value)
    for item in (value.items() if isinstance(value, dict) else value):
        total += size_of(item, memo, depth + 1)
        if total > MAX_SIZE:
            break
    memo[id(value)] = total
    return total


def _check(size: int, what: str = "a value") -> None:
    if size > MAX_SIZE:
        raise _limit_error(what, size)


def _check_int(n, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and abs(n) > MAX_SIZE:
        raise _limit_error(what, n, number=True)


def _format_widths(fmt: str, args) -> None:
    """`fmt % args` and `fmt.format(...)`: no width or precision over the limit (a `*` one included)."""
    for width, precision in _SPEC.findall(fmt):
        for n in (width, precision):
            if n.isdigit():
                _check_int(int(n), "a format's width")
        if "*" in (width, precision):
            for a in args if isinstance(args, tuple) else (args,):
                _check_int(a, "a format's width")
    for n in _FIELD_NUMBER.findall(fmt):
        _check_int(int(n), "a format's width")


def _binop(op: str, left, right):
    """The size of ``left op right``, checked before it is computed."""
    seqs = (str, list, tuple)
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, seqs) and isinstance(n, int) and not isinstance(n, bool):
                _check(size_of(seq) * max(n, 0), "a repeated value")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _bits_error(left.bit_length() + right.bit_length())
    elif op == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        _check(size_of(left) + size_of(right), "a joined value")
    elif op == "%" and isinstance(left, str):
        _format_widths(left, right)
        _check(size_of(left) + size_of(right), "a formatted value")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * left.bit_length() > MAX_INT_BITS:
            raise _bits_error(right * left.bit_length())


def _expected_size(name: str, value, args: tuple, kwargs: dict) -> int:
    """What a str method or filter named `name` applied to `value` would produce, at most (before it runs)."""
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    for n in numbers:
        _check_int(n, f"{name}()")
    size = size_of(value) + sum(size_of(a) for a in (*args, *kwargs.values()))
    width = max(numbers, default=0)
    if isinstance(value, str):
        if name in ("indent", "expandtabs"):
            count = value.count("\n" if name == "indent" else "\t") + 1
            size += count * (width if name == "expandtabs" else max(width, size_of(args[0]) if args else 0))
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            size += (value.count(args[0]) if args[0] else len(value) + 1) * len(args[1])
        elif name in ("format", "format_map"):
            _format_widths(value, args)
        size += width
    if name == "join" and args and isinstance(value, (list, tuple)):
        size += size_of(args[0]) * len(value)
    return size


def _guard_filter(name: str, func):
    from jinja2.utils import _PassArg

    skip = 1 if _PassArg.from_obj(func) is not None else 0  # the context jinja2 passes first

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        value, rest = (args[skip], args[skip + 1:]) if len(args) > skip else (None, ())
        _check(_expected_size(name, value, rest, kwargs), f"the result of |{name}")
        result = func(*args, **kwargs)
        _check(size_of(result), f"the result of |{name}")
        return result

    return guarded


class _GuardedFilters(dict):
    """The environment's filters, each wrapped by :func:`_guard_filter` (those added later too)."""

    def __setitem__(self, name, func):
        super().__setitem__(name, _guard_filter(name, func))


def _code_generator_class():
    from jinja2.compiler import CodeGenerator

    class _CodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # jinja2's, with the parts' size checked before they are joined
            if frame.eval_ctx.volatile:
                join = "(markup_join if context.eval_ctx.volatile else str_join)"
            elif frame.eval_ctx.autoescape:
                join = "markup_join"
            else:
                join = "str_join"
            self.write(f"environment.bounded_join({join}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    return _CodeGenerator


def _environment_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with no value over MAX_SIZE (see the module docstring)."""

        code_generator_class = _code_generator_class()
        intercepted_binops = frozenset({"*", "+", "%", "**"})

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            filters, self.filters = self.filters, _GuardedFilters()
            for name, func in filters.items():
                self.filters[name] = func
            self.finalize = self._check_output  # every {{ value }}, before it becomes text

        @staticmethod
        def _check_output(value):
            _check(size_of(value), "an output")
            return value

        @staticmethod
        def concat(chunks):  # the rendered text, chunk by chunk
            out, total = [], 0
            for chunk in chunks:
                total += len(chunk)
                _check(total, "a rendered text")
                out.append(chunk)
            return "".join(out)

        @staticmethod
        def bounded_join(join, parts):
            memo: dict = {}
            _check(sum(size_of(p, memo) for p in parts), "a joined value (~)")
            return join(parts)

        def wrap_str_format(self, value):  # 'x'.format(...): jinja2 wraps it on attribute access, not in call
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt = value.__self__

            def bounded(*args, **kwargs):
                _check(_expected_size("format", fmt, args, kwargs), "the result of .format()")
                return wrapped(*args, **kwargs)

            bounded.__name__ = value.__name__
            return bounded

        def call_binop(self, context, op, left, right):
            _binop(op, left, right)
            return super().call_binop(context, op, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, (str, list, tuple, dict)):  # a method such as 'a'.ljust(n), ', '.join(xs)
                name = getattr(__obj, "__name__", "")
                _check(_expected_size(name, owner, args, kwargs), f"the result of .{name}()")
            else:
                for a in (*args, *kwargs.values()):
                    _check_int(a, f"{getattr(__obj, '__name__', 'a function')}()")
            result = super().call(__context, __obj, *args, **kwargs)
            _check(size_of(result), "a call's result")
            return result

    return BoundedEnvironment


@functools.lru_cache(maxsize=1)
def bounded_environment_class():
    """:class:`BoundedEnvironment` (built on first use: jinja2 is imported only when templates are)."""
    return _environment_class()


def describe_error(err: BaseException) -> str:
    """A template error as one line: a syntax error with its template line, anything else shortened."""
    from jinja2.exceptions import TemplateSyntaxError

    if isinstance(err, TemplateSyntaxError):
        text = f"{err.message} (template line {err.lineno})"
    else:
        text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else f"{text[:300]}... ({len(text)} chars)"


def check_compiles(tokenizer) -> str | None:
    """What keeps the tokenizer's chat template(s) from compiling (one line), or None; compiles them once."""
    install()
    from transformers.utils import chat_template_utils as ctu

    templates = getattr(tokenizer, "chat_template", None)
    templates = templates.values() if isinstance(templates, dict) else [templates]
    for template in templates:
        if isinstance(template, str):
            try:
                ctu._compile_jinja_template(template)
            except Exception as e:  # noqa: BLE001 - jinja2 raises many types; all mean "this template is broken"
                return describe_error(e)
    return None


def install() -> bool:
    """Makes transformers render every chat template with :class:`BoundedEnvironment`; idempotent.

    Returns:
        True once installed; False if this transformers has no sandbox to replace (then templates render
        as transformers renders them, unbounded).
    """
    try:
        from transformers.utils import chat_template_utils as ctu
    except ImportError:
        return False
    cls = bounded_environment_class()
    if getattr(ctu, "ImmutableSandboxedEnvironment", None) is cls:
        return True
    if not hasattr(ctu, "ImmutableSandboxedEnvironment") or not hasattr(ctu, "_compile_jinja_template"):
        return False
    ctu.ImmutableSandboxedEnvironment = cls
    ctu._compile_jinja_template.cache_clear()  # templates compiled before, with the unbounded class
    return True
