"""aistock_pipelines: Dagster pipelines between the AIstock database, Qlib and RD-Agent.

Domain logic lives in plain modules (``export``, ``rdagent``, ``live``, ``demo``) that know nothing of
Dagster; ``definitions`` and the ``dagster_defs`` package are thin wiring around them.
"""

__version__ = "0.1.0"
