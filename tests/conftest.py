import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO / "tests" / "fixtures" / "mnist"  # the first 3,000 MNIST test images (its README)


def run_torchrun(nproc, script, *args, timeout=300):
    """Run `torchrun --standalone --nproc_per_node=N launch/<script> args`; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "launch" / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(script, *args, timeout=300):
    cmd = [sys.executable, str(REPO / "launch" / script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _worker(rank, world, init_file, fn, args):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world=2, *args):
    """Run fn(rank, world, *args) on `world` gloo ranks; an assertion failing on any rank fails the test.

    fn must be a module-level function (it is pickled into the child processes).
    """
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), fn, args), nprocs=world, join=True)


# Tests that start torchrun jobs, spawn ranks or train, and took 1.4 s or more each in a full run on the
# 2-core CPU (`pytest --durations=0`): marked slow here, in one place, so that `pytest -m "not slow"` (the
# fast subset: the unit tests, under a minute) leaves them to the full run, which CI makes.
SLOW = {
    "test_train.py": ["test_split_learns_mnist", "test_split_resume_and_bad_shard", "test_cli_bad_input_exit_status",
                      "test_resume_repeats_uninterrupted_run", "test_metrics_schema",
                      "test_split_and_single_log_the_same_losses"],
    "test_precision.py": ["test_micro_batches_repeat_the_plain_split_losses", "test_keep_freed_memory_is_on_by_default",
                          "test_check_passes_in_bf16_split", "test_train_fp16_uses_a_grad_scaler",
                          "test_train_cli_refusal_is_one_line_exit_2", "test_check_passes_in_bf16_streams",
                          "test_train_bf16_logs_finite_losses", "test_train_step_returns_the_loss_unread",
                          "test_fp16_ranks_skip_together_without_reading_the_flag"],
    "test_check.py": ["test_check_split_two_streams_full_size", "test_check_split_four_streams_reduced_size",
                      "test_check_split_one_stream_reduced_size", "test_check_catches_mismatched_dropout_masks",
                      "test_check_catches_a_wrong_gradient_rule", "test_check_streams_in_one_process",
                      "test_three_processes_are_refused_quickly", "test_verdict_names_its_criterion",
                      "test_bad_flags_get_one_line"],
    "test_mesh.py": ["test_check_two_streams_two_replicas", "test_check_fails_without_the_replica_allreduce",
                     "test_world_size_refusals_are_one_line"],
    "test_bench.py": ["test_quick_bench_writes_documented_json_and_plot", "test_bf16_halves_the_exchanged_bytes",
                      "test_cli_refuses_bad_input_with_one_line_and_exit_2", "test_overlap_equals_plain_split_and_bytes_match_spec"],
    "test_distributed.py": ["test_a_frozen_peer_ends_the_job_in_bounded_time", "test_nccl_follows_the_hardware"],
    "test_layouts.py": ["test_split_layout_equals_single_two_and_four_ranks"],
    "test_comm.py": ["test_comm_functions_four_ranks", "test_comm_functions_two_ranks",
                     "test_overlap_keeps_no_activations_after_the_step"],
    "test_checkpoint.py": ["test_cut_join_round_trip_bit_exact_and_same_logits"],
    "test_allocator.py": ["test_freed_buffers_are_reused_without_page_faults"],
    "test_recipe.py": ["test_resume_of_an_old_generator_checkpoint_is_one_line", "test_single_checkpoint_converted_keeps_every_streams_masks"],
    "test_first_minutes.py": ["test_a_short_run_plots_logs_and_says_how_to_go_on", "test_convert_names_what_it_wrote"],
    "test_cli.py": ["test_one_ranks_error_stops_every_rank"],
    "test_lrn.py": ["test_lrn_is_one_dynamo_graph", "test_traced_path_equals_eager_float64",
                    "test_traced_path_keeps_the_half_dtype"],
    "test_compile.py": ["test_single_layout_train_forward_is_one_graph",
                        "test_compiled_single_and_streams_steps_equal_eager_without_recompiling",
                        "test_compiled_split_step_equals_eager"],
    "test_cluster_runs.py": ["test_sigterm_then_the_same_command_repeats_the_uninterrupted_losses",
                             "test_torchrun_restart_after_a_killed_rank_continues_in_place",
                             "test_sbatch_script_twice_resumes_the_run", "test_run_folder_records_how_it_ran",
                             "test_metrics_rows_carry_time_and_every_groups_lr",
                             "test_folder_with_metrics_but_no_checkpoint_is_refused_with_the_fix",
                             "test_in_place_resume_drops_rows_past_the_checkpoint",
                             "test_a_signal_sets_the_flag_and_a_second_stops_at_once",
                             "test_sigusr1_stops_a_single_run_with_a_checkpoint",
                             "test_config_replays_a_runs_config_json_exactly", "test_tensorboard_writes_the_metrics_rows",
                             "test_wandb_is_off_by_default_and_refused_in_one_line_when_missing",
                             "test_keep_last_two_leaves_two",
                             "test_optimizer_state_goes_through_state_dict_and_old_checkpoints_load",
                             "test_fp16_resume_keeps_the_loss_scale", "test_convert_to_state_dict_loads_with_weights_only_alone",
                             "test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous"],
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
