"""The llama.cpp that scripts/setup builds leaves out the kernels it means to leave out.

pip reuses a wheel it built before whatever CMAKE_ARGS say, so a venv can end up with a
build that has them; set-up checks for that, and so does this test.
"""

from __future__ import annotations

import re

import llama_cpp


def test_llama_cpp_is_built_without_llamafile_and_amx_kernels() -> None:
    info = llama_cpp.llama_print_system_info().decode()
    assert info.startswith("CPU :"), info  # the line the check reads is still there
    found = re.findall(r"(LLAMAFILE|AMX_INT8) = 1", info)
    assert not found, f"llama.cpp built with {found}: rerun ./scripts/setup ({info})"
