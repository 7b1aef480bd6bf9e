"""Patch-query instance retrieval.

Data flow: ``images`` (loading, resize rule) → ``backbones`` + ``model`` (features) →
``encoding`` + ``index``/``build`` (gallery index on disk) → ``search`` (coarse FAISS,
then ``matching``: ``correlation`` eq. 3, ``fusion`` eq. 4, ``regions`` eq. 5) →
``viz`` (heatmaps, boxes) → ``app.py``. Training: ``data``, ``losses``, ``train``.
Evaluation: ``evaluation/``. Command line: ``python -m retrieval``.
"""
