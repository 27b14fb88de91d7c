"""A real 2-process JAX run on CPU (gloo): each process reads a disjoint share, together exactly the epoch.

The test starts two copies of this file as subprocesses (gloo collectives on one machine stand in for a pod);
each one joins a 2-process, 8-device mesh, builds its per-process pipeline, turns every host batch into a global
`jax.Array` batch and writes what it saw to JSON.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

GLOBAL_BATCH = 8


def _process_main(rank, port, processor_dir, record_dir, out_path):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
    from mme5_jax.data.pipeline import PipelineConfig, image_layout, load_processor, make_dataset, to_global_batch

    config = PipelineConfig(processor_dir=processor_dir, global_batch_size=GLOBAL_BATCH, max_length=128,
                            length_buckets=(24, 32, 48, 64), seed=7)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    pad = load_processor(processor_dir, "processor", 128, 89_478_485).pad_token_id
    seen, local_lengths, global_shapes, local_images, global_images = [], [], [], [], []
    for host in make_dataset(config, [record_dir], process_index=jax.process_index(),
                             process_count=jax.process_count(), layout=image_layout(mesh, GLOBAL_BATCH)):
        batch = to_global_batch(host, mesh, pad)
        local_images.append(host["images"]["row_id"].shape[2])
        global_images.append(list(batch["images"]["row_id"].shape))
        shards = sorted(batch["record_index"].addressable_shards, key=lambda s: s.index[0].start)
        local_rows = np.concatenate([np.asarray(s.data) for s in shards])
        assert sorted(local_rows.tolist()) == sorted(host["record_index"].tolist())
        seen.extend(host["record_index"].tolist())
        local_lengths.append(host["query"]["input_ids"].shape[1])
        global_shapes.append(list(batch["negatives"]["input_ids"].shape))
    with open(out_path, "w") as f:
        json.dump({"process_index": jax.process_index(), "devices": jax.device_count(), "seen": seen,
                   "local_lengths": local_lengths, "global_shapes": global_shapes, "local_images": local_images,
                   "global_images": global_images}, f)
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_disjoint_shares_of_the_epoch(tmp_path):
    from assets import make_processor_dir
    from mme5_jax.data.demo import write_scene_split

    processor_dir = make_processor_dir(str(tmp_path / "processor"), image_size=28, max_image_tiles=4)
    record_dir = write_scene_split(tmp_path / "train", "train", 96, image_size=32, seed=1, records_per_shard=40)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    outputs = [tmp_path / f"process{rank}.json" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), processor_dir, str(record_dir),
                               str(outputs[rank])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0].decode(errors="replace"))
        finally:
            proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    results = [json.loads(path.read_text()) for path in outputs]
    assert [r["process_index"] for r in results] == [0, 1] and {r["devices"] for r in results} == {8}
    shares = [set(r["seen"]) for r in results]
    assert len(results[0]["seen"]) == len(results[1]["seen"]) == 48
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(96))
    for a, b in zip(*(r["global_shapes"] for r in results)):
        assert a == b and a[:2] == [GLOBAL_BATCH, 3]
        assert a[2] >= 24
    # buckets chosen per process can differ; the global batch takes the longer one
    for shape, la, lb in zip(results[0]["global_shapes"], results[0]["local_lengths"], results[1]["local_lengths"]):
        assert shape[2] == max(la, lb)
    # so do the images per device: every device of the global batch holds the larger count
    for shape, ma, mb in zip(results[0]["global_images"], results[0]["local_images"], results[1]["local_images"]):
        assert shape == [1, 8 * max(ma, mb)]
    assert results[0]["global_images"] == results[1]["global_images"]


if __name__ == "__main__":
    _process_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
