"""Demo copy of RD-Agent's shared factor package ``rd_factors_lib``: one module of factor
functions (``generated.py``) and a ``VERSION`` file.

The real package is a separate distribution (``pip install -e <rd-factors-lib>``) maintained by RD-Agent;
this copy exists so the demo and the tests can resolve the catalog's ``impl_module: rd_factors_lib.generated``
pointers without it. It is *not* installed as a top-level ``rd_factors_lib`` (that would shadow the real
package): pointers reach it through the import-root mapping of
:class:`aistock_pipelines.rdagent.factor_impl.FactorPackages`
(``AISTOCK_FACTOR_PACKAGES=rd_factors_lib=aistock_pipelines.demo.rd_factors_lib``).

``__version__`` is read from ``VERSION``, the file RD-Agent bumps and copies into each factor's
``impl_version`` (a UTC date string in practice).
"""

from __future__ import annotations

from pathlib import Path

__version__: str = Path(__file__).with_name("VERSION").read_text(encoding="utf-8").strip()
