"""The optional compiled merge loops (``hm3.merging._native``, issue 6); everything else is in
pyproject.toml. Without a C compiler the build goes on without them and hm3 runs its numpy kernels."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hm3.merging._native",
            sources=["src/hm3/merging/_native.c"],
            # the same float32 operations as numpy's: no fused multiply-add, no fast-math reordering
            # (-fno-trapping-math only lets comparisons become vector masks; no result changes;
            # -Wno-psabi: the 8-lane vector helpers are inlined, no vector crosses a call)
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-Wno-psabi"],
            optional=True,
        )
    ]
)
