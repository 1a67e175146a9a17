"""Builders and real peers shared by the tests and the benchmark.

``images``: synthetic radiograph datasets and compressed copies (dcmtk).
``models``: tiny card-conformant models.
``peers``: free ports, Orthanc and dcmtk processes on loopback.
"""
