"""``python -m mlx_gpt.seq2seq``: train the date translator (see train.py), with the CPU plug-in enabled first."""

from mlx_gpt import cli, cpu

cpu.enable(build_kernels=True)  # before MLX is imported: it may load a BLAS for MLX

from mlx_gpt.seq2seq.train import main  # noqa: E402

cli.run(main)
