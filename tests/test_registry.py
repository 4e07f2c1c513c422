"""The one registry every named implementation goes through (privtune.registry)."""

import pytest

from privtune.attacks.mia import ATTACKS, get_attack
from privtune.auditing.designs import DESIGNS
from privtune.data.corpora import CORPORA, generate_corpus
from privtune.errors import PrivtuneError
from privtune.registry import Registry
from privtune.train.dp import DP_ENGINES, make_clipper


def test_a_name_is_registered_once_and_read_back_as_a_mapping():
    things = Registry("widget")
    things.register("b")(len)
    things.register("a")(str)
    assert list(things) == ["b", "a"] and things["a"] is str and len(things) == 2 and "b" in things
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        things.register("a")(repr)


def test_an_unknown_name_is_one_line_naming_the_known_ones():
    things = Registry("widget", alternative="or a path", sort=True)
    things.register("b")(len)
    things.register("a")(str)
    with pytest.raises(PrivtuneError, match=r"unknown widget 'c'.*use one of: a, b, or a path") as caught:
        things.lookup("c")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("lookup, unknown, names", [
    (get_attack, "unknown attack 'x'", ATTACKS), (make_clipper, "unknown DP engine 'x'", DP_ENGINES),
    (lambda n: generate_corpus(n, 3, 0), "unknown corpus 'x'", CORPORA),
    (DESIGNS.lookup, "unknown audit canary design 'x'", DESIGNS)])
def test_every_registry_of_privtune_reports_unknown_names_alike(lookup, unknown, names):
    with pytest.raises(PrivtuneError, match=unknown) as caught:
        lookup("x")
    assert all(name in str(caught.value) for name in names)
