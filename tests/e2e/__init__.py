"""End-to-end runs of the shipped entry points on a little real data."""

# Curation of 48 real easy-vqa images into 4 clusters of at most 10 (`--curate-override` arguments)
SMALL_CURATION = [
    "--curate-override",
    "scan.max_images=48",
    "--curate-override",
    "cluster.k=4",
    "--curate-override",
    "select.per_cluster=10",
]
