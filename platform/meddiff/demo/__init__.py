"""The main job (``meddiff demo``): every stage of both papers end to end on the embedded default.

:mod:`~meddiff.demo.run` runs the steps (each through the same library calls a cluster job
makes) and resumes an interrupted demo; :mod:`~meddiff.demo.evaluate_step` and
:mod:`~meddiff.demo.serve_step` are its evaluation and serving steps; :mod:`~meddiff.demo.index`
writes the one page that links every step's outputs.
"""
