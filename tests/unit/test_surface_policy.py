"""The shared policy for unservable input, and reasoning sealed for the client."""

from __future__ import annotations

import os

import pytest

from flashserve.api.sealed_reasoning import open_reasoning, seal_reasoning
from flashserve.api.surface_policy import DROPPED_TOOLS_HEADER, dropped_tools_headers, refuse_content
from flashserve.errors import FlashserveError
from flashserve.server_key import ServerKey


def test_dropped_tools_header_lists_each_name_once_and_is_absent_when_none() -> None:
    assert dropped_tools_headers(["web_search", "code_interpreter", "web_search"]) == {
        DROPPED_TOOLS_HEADER: "web_search, code_interpreter"}
    assert dropped_tools_headers([]) == {}


def test_refused_content_is_a_400_naming_where_it_was() -> None:
    error = refuse_content("image", "messages[0].content[1]")
    assert (error.status, error.param, error.code) == (400, "messages[0].content[1]", "unsupported_content")
    assert "image" in error.message


def test_sealed_reasoning_opens_only_for_its_account_and_key() -> None:
    key = ServerKey(os.urandom(32), "test")
    token = seal_reasoning(key, "acct_a", "first think, then answer")
    assert "think" not in token
    assert open_reasoning(key, "acct_a", token, "p") == "first think, then answer"
    for account, other_key, text in (("acct_b", key, token), ("acct_a", ServerKey(os.urandom(32), "t"), token),
                                     ("acct_a", key, token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])):
        with pytest.raises(FlashserveError) as caught:
            open_reasoning(other_key, account, text, "messages[1].content[0].signature")
        assert (caught.value.status, caught.value.param) == (400, "messages[1].content[0].signature")
