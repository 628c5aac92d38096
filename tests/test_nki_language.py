"""The interpreter's NKI language front end and loop semantics (SDK 2.28 guides in
``../shared/reference/nki-api-2.28.1/guides/``): every construct the guides do not allow is refused with its
rule, guide section and line; ``affine_range`` runs its iterations out of order, ``sequential_range`` in
order, and both count their body once in the static instruction count."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

from neuron_kernels.interpreter import NkiLanguageError, run_kernel
from neuron_kernels.interpreter import isa as nisa
from neuron_kernels.interpreter import language as nl
from neuron_kernels.interpreter import runtime as nki

# Kernels that break one rule each ------------------------------------------------------------------------


def _copy_rows(x, rows):
    """The one legal thing the kernels below do: x [rows, 4] -> a shared_hbm copy."""
    out = nl.ndarray((rows, 4), dtype=nl.float32, buffer=nl.shared_hbm)
    staged = nl.ndarray((rows, 4), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=staged, src=x)
    nisa.dma_copy(dst=out, src=staged)
    return out


def list_comprehension(x):
    sizes = [n for n in range(2)]
    return _copy_rows(x, len(sizes) + 2)


def generator_expression(x):
    return _copy_rows(x, max(n for n in (1, 4)))


def lambda_function(x):
    rows = lambda: 4  # noqa: E731  (the construct under test)
    return _copy_rows(x, rows())


def try_statement(x):
    try:
        return _copy_rows(x, 4)
    finally:
        pass


def with_statement(x):
    with open(__file__):
        return _copy_rows(x, 4)


def nested_function(x):
    def rows():
        return 4

    return _copy_rows(x, rows())


def enumerate_call(x):
    for index, _ in enumerate((1,)):
        out = _copy_rows(x, 4 + index)
    return out


def zip_call(x):
    for a, _ in zip((4,), (1,), strict=True):
        out = _copy_rows(x, a)
    return out


def list_call(x):
    starts = list(range(0, 4, 4))
    return _copy_rows(x, 4 + starts[0])


def nested_slicing(x):
    out = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.shared_hbm)
    staged = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=staged[0:4][0:4], src=x)
    nisa.dma_copy(dst=out, src=staged)
    return out


def integer_dict_key(x):
    sizes = {0: 4}
    return _copy_rows(x, sizes[0])


class PlainClass:
    rows = 4


class TwoBases(nl.NKIObject, PlainClass):
    pass


class Rows(nl.NKIObject):
    def __init__(self, count):
        self.count = count

    def doubled(self):
        return [self.count * n for n in (1, 2)]


def plain_class(x):
    return _copy_rows(x, PlainClass().rows)


def class_with_two_bases(x):
    return _copy_rows(x, TwoBases().rows)


def method_with_comprehension(x):
    return _copy_rows(x, Rows(2).doubled()[1])


@nki.jit
def decorated_sub_kernel(x):
    return _copy_rows(x, 4)


def calls_a_sub_kernel(x):
    return decorated_sub_kernel(x)


def _helper_with_comprehension(rows):
    return [rows for _ in range(1)][0]


def helper_breaks_a_rule(x):
    return _copy_rows(x, _helper_with_comprehension(4))


def list_indexed_by_loop_index(x):
    sizes = [4, 4]
    for i in nl.affine_range(2):
        out = _copy_rows(x, sizes[i])
    return out


FORBIDDEN = [
    (list_comprehension, "list comprehension", "NKI Language Guide, section 'NKI Values / Control Flow'"),
    (generator_expression, "generator expression", "section 'NKI Values / Control Flow'"),
    (lambda_function, "lambda", "section 'NKI Values / Control Flow'"),
    (try_statement, "try statement", "section 'NKI Values / Control Flow'"),
    (with_statement, "with statement", "section 'NKI Values / Control Flow'"),
    (nested_function, "nested function 'rows'", "section 'NKI Values / Control Flow'"),
    (enumerate_call, "enumerate(...)", "NKI Language Guide, section 'Control Flow'"),
    (zip_call, "zip(...)", "section 'Control Flow'"),
    (list_call, "list(...)", "section 'Control Flow'"),
    (nested_slicing, "staged[0:4][0:4]: nested slicing", "not available in nki.*"),
    (integer_dict_key, "key 0: dictionaries support only string keys", "NKI Migration Guide"),
    (plain_class, "class PlainClass(object)", "section 'Class Support'"),
    (class_with_two_bases, "class TwoBases(NKIObject, PlainClass)", "section 'Class Support'"),
    (method_with_comprehension, "in Rows.doubled: list comprehension", "NKI Values / Control Flow"),
    (calls_a_sub_kernel, "call of decorated_sub_kernel", "section 'Remove nki.jit decorator on sub-kernels'"),
    (helper_breaks_a_rule, "in _helper_with_comprehension: list comprehension", "Control Flow"),
    (list_indexed_by_loop_index, "sizes[i]: a Python list cannot be indexed", "section 'Dynamic Control Flow'"),
]


def _line_of(fn, snippet: str) -> int:
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if snippet in line)


@pytest.mark.parametrize(("kernel", "detail", "section"), FORBIDDEN, ids=[case[0].__name__ for case in FORBIDDEN])
def test_front_end_refuses_what_the_guides_do_not_allow(kernel, detail, section):
    with pytest.raises(NkiLanguageError, match=re.escape(detail)) as error:
        run_kernel(kernel, np.ones((4, 4), dtype=np.float32))
    assert section in str(error.value)
    assert re.search(r"test_nki_language\.py:\d+: in ", str(error.value)), "the error names file and line"


def test_error_points_at_the_offending_line():
    with pytest.raises(NkiLanguageError) as error:
        run_kernel(zip_call, np.ones((4, 4), dtype=np.float32))
    assert f"test_nki_language.py:{_line_of(zip_call, 'zip(')}:" in str(error.value)


# What the language allows ----------------------------------------------------------------------------------


class Plan(nl.NKIObject):
    """A kernel-side class: inherits NKIObject only."""

    def __init__(self, rows):
        self.rows = rows
        self.names = {"rows": rows}

    def row_count(self):
        return min(self.names["rows"], max(self.rows, 1))


def allowed_constructs(x):
    plan = Plan(4)
    sizes = []
    for n in nl.static_range(2):
        sizes.append(n)
    out = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.shared_hbm)
    for i in nl.affine_range(2):
        staged = nl.ndarray((plan.row_count(), 2), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=staged, src=x[:, i * 2 : i * 2 + 2])
        nisa.dma_copy(dst=out[:, i * 2 : i * 2 + 2], src=staged)
    return out


def test_front_end_accepts_nki_classes_device_loops_and_string_keyed_dicts():
    values = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(run_kernel(allowed_constructs, values).outputs, values)


# Loop semantics ------------------------------------------------------------------------------------------


def _running_sum(x, loop):
    """out[:, i] = Σ_{j <= i} x[:, j], carried through ``total`` from iteration to iteration of ``loop``."""
    columns = x.shape[1]
    out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
    values = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=values, src=x)
    total = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=total, value=0.0)
    for i in loop(columns):
        nisa.tensor_tensor(dst=total, data1=total, data2=values[:, i : i + 1], op=nl.add)
        nisa.dma_copy(dst=out[:, i : i + 1], src=total)
    return out


def running_sum_sequential(x):
    return _running_sum(x, _sequential)


def running_sum_affine(x):
    return _running_sum(x, nl.affine_range)


def _sequential(count):
    return nl.sequential_range(0, count, 1)


def test_a_loop_carried_dependency_is_right_in_sequential_range_and_wrong_in_affine_range():
    values = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    expected = np.cumsum(values, axis=1)
    np.testing.assert_allclose(run_kernel(running_sum_sequential, values).outputs, expected, rtol=1e-6)
    for seed in range(3):
        wrong = run_kernel(running_sum_affine, values, loop_seed=seed).outputs
        assert not np.allclose(wrong, expected), "affine_range must not run its iterations in program order"


def _record_order(x):
    """out[0, k] = the index of the k-th iteration that ran."""
    out = nl.ndarray((1, 6), dtype=nl.float32, buffer=nl.shared_hbm)
    position = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.sbuf)
    order = []
    for i in nl.affine_range(6):
        order.append(i)
    for k in nl.static_range(6):
        nisa.memset(dst=position, value=order[k])
        nisa.dma_copy(dst=out[:, k : k + 1], src=position)
    return out


def test_affine_range_order_is_a_seeded_permutation():
    first = run_kernel(_record_order, np.zeros((1, 1), dtype=np.float32), loop_seed=1).outputs[0]
    again = run_kernel(_record_order, np.zeros((1, 1), dtype=np.float32), loop_seed=1).outputs[0]
    other = run_kernel(_record_order, np.zeros((1, 1), dtype=np.float32), loop_seed=2).outputs[0]
    assert sorted(first) == list(range(6)) and list(first) != list(range(6))
    np.testing.assert_array_equal(first, again)
    assert list(first) != list(other)


def shrinking_last_tile(x):
    out = nl.ndarray((4, 5), dtype=nl.float32, buffer=nl.shared_hbm)
    for start in nl.sequential_range(0, 5, 2):
        width = min(2, 5 - start)
        staged = nl.ndarray((4, width), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=staged, src=x[:, start : start + width])
        nisa.dma_copy(dst=out[:, start : start + width], src=staged)
    return out


def test_device_loop_body_must_be_the_same_program_every_iteration():
    with pytest.raises(NkiLanguageError, match="iteration 2 ran .* pad the last tile"):
        run_kernel(shrinking_last_tile, np.ones((4, 5), dtype=np.float32))


def nested_loops(x):
    out = nl.ndarray((4, 6), dtype=nl.float32, buffer=nl.shared_hbm)
    for i in nl.affine_range(3):
        for j in nl.sequential_range(0, 2, 1):
            staged = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=staged, src=x[:, 2 * i + j : 2 * i + j + 1])
            nisa.dma_copy(dst=out[:, 2 * i + j : 2 * i + j + 1], src=staged)
    for k in nl.static_range(2):
        nisa.dma_copy(dst=out[:, k : k + 1], src=x[:, k : k + 1])
    return out


def test_static_count_holds_each_device_loop_body_once_and_unrolled_loops_in_full():
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    run = run_kernel(nested_loops, values)
    np.testing.assert_array_equal(run.outputs, values)
    assert run.stats.executed_instructions == 3 * 2 * 2 + 2
    assert run.stats.static_instructions == 2 + 2
    assert run.stats.summary()["static_instructions"] == 4
