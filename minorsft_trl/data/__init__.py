"""The data a run reads: the script's train and eval datasets from wherever they are (`sources`), checked record by
record (`file_checks`) and as datasets (`dataset_checks`), ShareGPT's roles (`sharegpt`); and the offline demo's
resources: BIG-bench tasks (`bigbench`) and their accuracy (`evaluation`), the embedded default model (`embedded`),
both fetched through pip's package index (`package_index`)."""
