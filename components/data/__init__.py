"""Data ingestion: read a source (Fashion-MNIST, a folder of images), validate every image, pack shards."""
