"""The CKP expression language (ckp.md §5.3-§5.5): tokenizer, recursive-descent parser and evaluator.

Expressions are parsed once into an immutable syntax tree and evaluated against a :class:`Scope`. Values are
never pasted into expression text, so data that looks like an operator can never change the parse.

Modules: :mod:`.syntax` (limits, errors, the syntax tree, the functions' arities), :mod:`.parser` (text and JSON
to syntax trees, template scanning), :mod:`.values` (JSON values, truthiness, scopes), :mod:`.evaluator` and
:mod:`.functions` (the built-in functions). Import from this package: the names below are its interface.
"""

from __future__ import annotations

from ckp_core.expressions.evaluator import evaluate, evaluate_condition
from ckp_core.expressions.parser import (
    ast_from_json,
    ast_to_json,
    expression_from_json,
    has_placeholder,
    parse_expression,
    referenced_roots,
    scan_template,
)
from ckp_core.expressions.syntax import (
    FUNCTIONS,
    MAX_DEPTH,
    MAX_PATTERN_BYTES,
    MAX_SOURCE_BYTES,
    MAX_STEPS,
    Access,
    Arith,
    ArithStep,
    BoolOp,
    Call,
    Compare,
    Const,
    EmptyTest,
    Expression,
    ExpressionError,
    ExpressionSyntaxError,
    FunctionArityError,
    Index,
    InvalidRegexError,
    ListExpr,
    Member,
    Name,
    Neg,
    Node,
    Not,
    PlaceholderExpr,
    TemplateStr,
    UnknownFunctionError,
)
from ckp_core.expressions.values import MappingScope, Scope, format_embedded, json_type_name, truthy

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_PATTERN_BYTES",
    "MAX_SOURCE_BYTES",
    "MAX_STEPS",
    "Access",
    "Arith",
    "ArithStep",
    "BoolOp",
    "Call",
    "Compare",
    "Const",
    "EmptyTest",
    "Expression",
    "ExpressionError",
    "ExpressionSyntaxError",
    "FunctionArityError",
    "Index",
    "InvalidRegexError",
    "ListExpr",
    "MappingScope",
    "Member",
    "Name",
    "Neg",
    "Node",
    "Not",
    "PlaceholderExpr",
    "Scope",
    "TemplateStr",
    "UnknownFunctionError",
    "ast_from_json",
    "ast_to_json",
    "evaluate",
    "evaluate_condition",
    "expression_from_json",
    "format_embedded",
    "has_placeholder",
    "json_type_name",
    "parse_expression",
    "referenced_roots",
    "scan_template",
    "truthy",
]

