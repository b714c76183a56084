"""The one compiled part: the Merkle verifier's hashing loop (``caracald.core._merkle_native``).

Optional: without a C compiler or OpenSSL's headers the build goes on without it, and
``caracald.core.merkle`` uses its pure-Python implementation (same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "caracald.core._merkle_native",
            ["caracald/core/_merkle_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
