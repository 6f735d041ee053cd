import pytest

from eve.overrides import set_dotted


def test_set_dotted_sections_list_items_and_errors():
    """Nested keys create sections; list items go by index; bad paths name the failing part."""
    tree = {"a": {"b": 1}, "items": [{"path": "x"}, {"path": "y"}]}
    set_dotted(tree, "a.c.d", 2)
    set_dotted(tree, "items.1.path", "z")
    assert tree == {"a": {"b": 1, "c": {"d": 2}}, "items": [{"path": "x"}, {"path": "z"}]}
    with pytest.raises(ValueError, match=r"'items.2': '2' is not an index of the 2-item list"):
        set_dotted(tree, "items.2.path", "w")
    with pytest.raises(ValueError, match=r"'a.b' is not a section"):
        set_dotted(tree, "a.b.c", 3)
