"""empathy-distill: distil empathetic dialogue from a teacher LLM into a small student.

    stage1_teacher/   `pipeline teacher-cache`: dialogues in, Parquet shards + manifest out (vLLM)
    stage2_distill/   `pipeline distill`: shards in, a trained student out (DeepSpeed)
    shared/           what both stages agree on: config, the shard schema, prompts, readers
    evaluation/       `pipeline evaluate`: students, baselines and the teacher on held-out data
    cli.py            the `pipeline` command;  run_pipeline.py  `pipeline run`

The two stages never import each other: they meet only in the shards and their manifest.
"""
