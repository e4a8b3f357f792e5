"""The cube runtime: applies a Plan (mesh, tensor parallel, pipeline, data parallel + ZeRO-1, recompute).

It consumes a Plan and never searches.
"""
