"""A checkpoint's --user-dir after the checkout was copied or moved (``cube.checkpoint.user_dir_here``)."""

import os

import pytest

import fairseq_ext
from fairseq_ext.cube.checkpoint import user_dir_here
from fairseq_ext.errors import UserInputError

HERE = os.path.dirname(os.path.abspath(fairseq_ext.__file__))


def test_a_recorded_fairseq_ext_elsewhere_is_the_one_imported_here(tmp_path):
    old_checkout = tmp_path / "old_checkout" / "fairseq_ext"
    old_checkout.mkdir(parents=True)  # still there (a copy) or gone (a move): the imported one is used
    assert user_dir_here(str(old_checkout)) == HERE
    assert user_dir_here(str(tmp_path / "moved_away" / "fairseq_ext")) == HERE
    assert user_dir_here(HERE) == HERE


def test_a_users_package_stays_where_it_is_or_is_one_clear_error(tmp_path):
    package = tmp_path / "my_ext_here"
    package.mkdir()
    assert user_dir_here(str(package)) == str(package)
    assert user_dir_here(None) is None
    with pytest.raises(UserInputError, match=r"--user-dir .*my_ext_gone, which does not exist any more"):
        user_dir_here(str(tmp_path / "my_ext_gone"))
