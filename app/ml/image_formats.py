"""The only image decoders Pillow ever runs on client bytes (upload checks, training, serving).

A module of its own, without torch: the ingest check imports it, and through the dataset service
so does the sweeper that runs beside every worker, which would otherwise load torch and timm
(about 700 MB and 2.5 s of CPU each) to do none of their work."""

IMAGE_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]
