"""Data code the scenario files share, so that a scenario file holds only its protocol.

- :mod:`~clbench.data.download`: fetching, verifying and extracting published files;
  ``DataStatus`` and the ``clbench list`` data marker.
- :mod:`~clbench.data.archive`: ``ArchiveData``, a data set shipped as one archive
  (its folder under the data root, status, fetch-once).
- :mod:`~clbench.data.files`: the repository root, the data root and small JSON /
  file-lookup helpers.
- :mod:`~clbench.data.fewrel_files`, :mod:`~clbench.data.tacred_files`,
  :mod:`~clbench.data.cub_files`, :mod:`~clbench.data.five_datasets_files`: where those
  data sets' files lie and whether they are there (the scenarios' data probes), torch-free
  like download and archive, so ``clbench list`` runs them without importing torch.
- :mod:`~clbench.data.vision`: ViT transforms, the transform-group benchmark, class orders.
- :mod:`~clbench.data.splits`: how classes are cut into tasks (equal, ``task_sizes``,
  B initial classes + increments of C, the automatic choice) and the checks of it.
- :mod:`~clbench.data.images`: datasets of image files / of images of several sizes;
  :mod:`~clbench.data.image_formats` the readers of CIFAR, IDX (MNIST), SVHN .mat and
  class-folder images.
- :mod:`~clbench.data.relations`: FewRel-format relation data (format checks, the
  RP-CRE / CRL split, the relation-scenario builder); :mod:`~clbench.data.relation_tokens`
  its entity-marked encoding and on-disk token cache.
"""
