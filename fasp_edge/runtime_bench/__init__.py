"""The runtime benchmark: device profiles, the measuring child process, the harness that plans and merges
measurements, and the bench report.

Nothing is imported here: ``python -m fasp_edge.runtime_bench.measure`` must load only the standard library
until it has applied its profile's CPU affinity and thread settings.
"""
