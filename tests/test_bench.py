"""`python -m lowbit.bench` runs end to end on tiny shapes and writes its table and plot."""

from __future__ import annotations

from lowbit.bench.__main__ import main


def test_bench_matmul_and_kv_tiny(tmp_path, capsys):
    md = tmp_path / "table.md"
    rc = main([
        "--op", "int4", "nf4", "ternary", "sparse24", "kv8", "kv4",
        "--shapes", "64x128", "--m", "1", "3", "--device", "cpu", "--dtype", "float32",
        "--group-size", "32", "--ctx", "64", "--heads", "4/2", "--head-dim", "32", "--budget", "0.01",
        "--markdown", str(md),
    ])
    assert rc == 0
    text = md.read_text()
    for op in ("int4_matmul", "nf4_matmul", "ternary_matmul", "sparse24_matmul", "kv_attention int8", "kv_attention int4"):
        assert op in text
    assert "F.linear float32" in text and "SDPA float32" in text
    assert "GB/s" in capsys.readouterr().out


def test_bench_plot(tmp_path):
    png = tmp_path / "speedup.png"
    main(["--op", "int4", "--shapes", "64x128", "--m", "1", "2", "--device", "cpu", "--group-size", "32",
          "--budget", "0.01", "--plot", str(png)])
    assert png.stat().st_size > 0
