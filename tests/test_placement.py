"""Where each data-parallel replica's vLLM engine runs: pure functions, no GPU needed."""

from __future__ import annotations

import pytest

from gift_megatron.rollout.placement import (
    PlacementError,
    check_layout,
    engine_devices,
    megatron_replica_ranks,
    replica_engine_devices,
    replica_local_ranks,
    visible_devices,
)

UUIDS = [
    "GPU-0a1b2c3d-0000-1111-2222-333344445555",
    "GPU-1a1b2c3d-0000-1111-2222-333344445555",
    "GPU-2a1b2c3d-0000-1111-2222-333344445555",
    "GPU-3a1b2c3d-0000-1111-2222-333344445555",
]


def _owners(world, tp, pp=1, cp=1):
    dp = world // (tp * pp * cp)
    return [d * tp * cp for d in range(dp)]


def test_megatron_rank_order_tp_cp_dp_pp():
    # tp-cp-ep-dp-pp: rank = tp + TP (cp + CP (dp + DP pp))
    assert megatron_replica_ranks(0, 8, 2) == [0, 1]
    assert megatron_replica_ranks(5, 8, 2) == [4, 5]
    assert megatron_replica_ranks(1, 8, 2, pp=2) == [0, 1, 4, 5]  # 2 replicas, stages 4 ranks apart
    assert megatron_replica_ranks(6, 8, 2, pp=2) == [2, 3, 6, 7]
    assert megatron_replica_ranks(3, 8, 2, cp=2) == [0, 1, 2, 3]
    assert megatron_replica_ranks(17, 32, 8, pp=2) == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23]
    # every rank is in exactly one replica
    for tp, pp, cp in [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 2, 2), (4, 2, 1)]:
        seen = sorted(r for o in set(tuple(megatron_replica_ranks(k, 16, tp, pp, cp)) for k in range(16)) for r in o)
        assert seen == list(range(16)), (tp, pp, cp)


@pytest.mark.parametrize("rollout_tp", [1, 2])
def test_7b_recipe_every_engine_on_its_own_pair(rollout_tp):
    """TP 2 x DP 4 on 8 GPUs: owners are ranks 0, 2, 4, 6 and each engine stays on its replica's pair (the
    old code put every rollout-TP-2 engine on GPUs 0-1)."""
    used = []
    for owner in _owners(8, 2):
        devices = replica_engine_devices(megatron_replica_ranks(owner, 8, 2), owner, owner, 8, rollout_tp, None)
        assert devices[0] == str(owner)  # the owner's own GPU first
        assert set(devices) <= {str(owner), str(owner + 1)}
        used += devices
    assert len(used) == len(set(used)) == 4 * rollout_tp  # no GPU shared by two engines


def test_rollout_tp4_uses_the_replicas_other_pipeline_stage_on_the_node():
    # TP 2 x PP 2 x DP 2 on one node: replica 0 is ranks 0, 1, 4, 5, so rollout TP 4 takes GPUs 0, 1, 4, 5.
    assert replica_engine_devices(megatron_replica_ranks(0, 8, 2, pp=2), 0, 0, 8, 4, None) == ["0", "1", "4", "5"]
    assert replica_engine_devices(megatron_replica_ranks(2, 8, 2, pp=2), 2, 2, 8, 4, None) == ["2", "3", "6", "7"]


def test_multi_node_32b_recipe():
    # TP 8 x PP 2 x DP 2 on 4 nodes: owners 0 (node 0) and 8 (node 1), each with its node's 8 GPUs.
    for owner in (0, 8):
        ranks = megatron_replica_ranks(owner, 32, 8, pp=2)
        assert replica_local_ranks(ranks, owner, owner % 8, 8) == list(range(8))  # stage 1 is on another node
        assert replica_engine_devices(ranks, owner, owner % 8, 8, 4, None) == ["0", "1", "2", "3"]
    assert check_layout(32, 8, 8, 2, 1, 8) == [str(i) for i in range(8)]
    with pytest.raises(
        PlacementError,
        match=r"rollout.tensor_parallel_size=16 does not fit .* has 8 GPU\(s\) on its "
        r"engine owner's node \(of its 16 ranks\)",
    ):
        check_layout(32, 8, 8, 2, 1, 16)


def test_inherited_subset_of_indices():
    # The job sees physical GPUs 4-7 only: local rank i drives visible entry i.
    assert replica_engine_devices([2, 3], 2, 2, 4, 2, "4,5,6,7") == ["6", "7"]
    assert replica_engine_devices([2, 3], 2, 2, 4, 1, " 4, 5,6 ,7") == ["6"]


def test_uuids_and_mig_ids_are_passed_verbatim():
    """int() on a UUID entry was the old failure: entries are copied, never parsed."""
    value = ",".join(UUIDS)
    assert replica_engine_devices([2, 3], 2, 2, 4, 2, value) == UUIDS[2:4]
    mig = "MIG-5c4e3f2a-1b0d-4e9f-8a7b-6c5d4e3f2a1b"
    assert replica_engine_devices([0], 0, 0, 1, 1, mig) == [mig]


@pytest.mark.parametrize("rollout_tp", [1, 2, 4])
def test_tp_1_2_4_on_a_replica_of_four(rollout_tp):
    ranks = megatron_replica_ranks(4, 8, 4)  # TP 4 x DP 2: replica 1 is ranks 4-7
    devices = replica_engine_devices(ranks, 4, 4, 8, rollout_tp, ",".join(UUIDS + ["a", "b", "c", "d"]))
    assert devices == ["a", "b", "c", "d"][:rollout_tp]


@pytest.mark.parametrize("world, tp, pp, rollout_tp", [(8, 1, 1, 2), (8, 2, 1, 4), (16, 8, 2, 16)])
def test_rollout_tp_that_does_not_fit_is_a_clear_error(world, tp, pp, rollout_tp):
    with pytest.raises(
        PlacementError,
        match=rf"rollout.tensor_parallel_size={rollout_tp} does not fit the "
        r"data-parallel replica's GPUs.*set rollout.tensor_parallel_size <=",
    ):
        check_layout(world, 8, tp, pp, 1, rollout_tp)
    owner = 0
    with pytest.raises(PlacementError, match="does not fit"):
        replica_engine_devices(
            megatron_replica_ranks(owner, world, tp, pp), owner, owner, min(world, 8), rollout_tp, None
        )


def test_visible_list_too_short_and_malformed_values():
    with pytest.raises(PlacementError, match="CUDA_VISIBLE_DEVICES lists 2 GPU"):
        engine_devices([2, 3], 2, ["0", "1"])
    assert visible_devices(None) is None and visible_devices("") == []
    with pytest.raises(PlacementError, match="empty entry"):
        visible_devices("0,,1")
    with pytest.raises(PlacementError, match="names a GPU twice"):
        visible_devices("0,1,0")
    with pytest.raises(PlacementError, match="LOCAL_RANK 8 is outside LOCAL_WORLD_SIZE 8"):
        replica_local_ranks([8], 8, 8, 8)
    with pytest.raises(PlacementError, match="not a multiple"):
        megatron_replica_ranks(0, 6, 4)


def test_config_validation_refuses_it_where_the_layout_is_known(tmp_path):
    import yaml

    from gift_megatron.config import ConfigError, check_world_size, load_config
    from gift_megatron.layout_plan import layout_plan

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"seq_length": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2},
                "data": {"max_prompt_tokens": 16},
                "rollout": {"n": 4, "max_tokens": 8, "engine": "vllm"},
                "train": {"prompts_per_step": 8, "micro_batch_size": 4},
            }
        )
    )
    cfg = load_config(path, ["parallel.tensor_model_parallel_size=2", "rollout.tensor_parallel_size=4"])
    assert check_world_size(cfg, 8) == 4  # no node size given: nothing to check against
    with pytest.raises(ConfigError, match=r"rollout.tensor_parallel_size=4 does not fit.*8 GPUs per node"):
        check_world_size(cfg, 8, gpus_per_node=8)
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size=4 does not fit"):
        layout_plan(cfg, 8)
    hf = load_config(
        path, ["parallel.tensor_model_parallel_size=2", "rollout.tensor_parallel_size=4", "rollout.engine=hf"]
    )
    assert check_world_size(hf, 8, gpus_per_node=8) == 4  # the CPU engine places nothing on GPUs


def test_factory_places_the_trainers_engine_on_its_replica(monkeypatch):
    """build_engine's placement inside a (simulated) 8-rank CUDA job: rank 2 owns replica 1 of TP 2 x DP 4,
    its engine gets GPUs 2 and 3 of the inherited UUID list; rollout TP 4 is refused before vLLM starts."""
    import torch

    from gift_megatron.config import TrainConfig
    from gift_megatron.rollout.factory import engine_cuda_devices

    cfg = TrainConfig()
    cfg.parallel.tensor_model_parallel_size, cfg.rollout.tensor_parallel_size = 2, 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("GIFT_MEGATRON_DEVICE", "auto")  # the process trains on the (simulated) GPUs
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(UUIDS + [u.replace("GPU-", "GPU-f") for u in UUIDS]))
    assert engine_cuda_devices(cfg) == UUIDS[2:4]
    assert engine_cuda_devices(cfg, replica_ranks=[2, 3]) == UUIDS[2:4]
    cfg.rollout.tensor_parallel_size = 4
    with pytest.raises(PlacementError, match="rollout.tensor_parallel_size=4 does not fit"):
        engine_cuda_devices(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_cuda_devices(cfg) is None  # the CPU backend places nothing
