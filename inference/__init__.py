"""Segmenting images with a trained model: sliding window, post-processing, original geometry.

:mod:`inference.settings` holds the one settings object of this stage; :mod:`inference.sliding_window`
blends window predictions over a preprocessed case; :mod:`inference.postprocess` cleans the label map;
:mod:`inference.geometry` puts it back into the original image grid and writes it (NIfTI, MetaImage,
NRRD); :mod:`inference.dicom` writes DICOM Segmentations (highdicom, optional); :mod:`inference.inputs`
turns ``--input`` files and folders (channel files, DICOM series) into cases;
:mod:`inference.predictor` ties them together (:class:`inference.predictor.Segmenter`), for
``predict.py`` and for training's validation alike; :mod:`inference.exported` makes a domain exported
by ``python -m models.export`` (ONNX, TorchScript) the predictor's model (``predict.py --model``).
:mod:`inference.backends` resolves ``--precision``/``--backend`` (bf16, ONNX Runtime; what ``auto`` picks).

Imports: ``utils`` and ``models`` (and third-party libraries); never ``training`` or ``demo``.
"""
