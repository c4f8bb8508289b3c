"""editstream: streaming knowledge editing for LLMs.

The library half of the project: models, edit requests, data sets, metrics, editing methods and
the replica that serves an edited model. It imports neither Ray nor Redis; `services/` wires it
into a running system.
"""

__version__ = "0.1.0"
