"""Loads the compiled operator library, or says how to build it.

There is no pure-Python fallback: a missing or broken build is an error, never
a silently slow optimizer.
"""

_BUILD_HINT = (
    "fusedclip's compiled extension (fusedclip._C) {what}. Build it against the "
    "installed torch with:\n"
    "    pip install --no-build-isolation -e .\n"
    "from the fusedclip source tree (needs a C++ compiler and ninja; the CUDA "
    "kernels also need nvcc), or run `make test`, which sets everything up."
)


def load():
    try:
        from fusedclip import _C  # noqa: F401  (registers torch.ops.fusedclip.*)
    except ImportError as error:
        what = "is not built" if "_C" in str(error) and "cannot import" in str(error) else (
            f"failed to load ({error})"
        )
        raise ImportError(_BUILD_HINT.format(what=what)) from error
