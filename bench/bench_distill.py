"""Multi-student distillation: step time with 1 and 2 students, the teacher's inference shared.

CPU case (one process, students in turn, as `python distill.py` runs them): a vit_small teacher with heads of
4096 prototypes (the "big" model: its forward costs more than either student's training step), students vit_tiny
and convnext_test, batch 16, 2 x 96 px global + 4 x 48 px local crops (the demo's sizes). Timed, best of N:

    teacher     teacher forward on the batch + share_batch (the all-gather; a reshape in one process)
    student X   distill.train_student_step of X alone (forward, losses, backward, AdamW)
    1 student   teacher + vit_tiny            2 students   teacher + vit_tiny + convnext_test

The claim: adding a student adds only its own training cost, `2 students - 1 student ~ student convnext_test`,
where two separate distillation runs would cost one more teacher inference (`separate runs`). On several ranks the
teacher's share per rank drops to B/W images while each student group trains on B/w_i (see distill.py's docstring);
with 2 CPU cores that layout has nothing to show (the ranks would share the cores), so it is not timed here.
"""

import torch

import distill
import runtime
from bench.common import report, time_call
from config import ModelConfig
from data.augment import AugmentConfig, CropSizes
from data.datasets import SampleImagesDataset, build_loader
from student_teacher import SSLNet

BATCH, GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 16, 96, 48, 4
TEACHER = ModelConfig(arch="vit_small", dino_prototypes=4096, dino_hidden=2048, dino_bottleneck=256,
                            ibot_prototypes=4096, ibot_hidden=2048, ibot_bottleneck=256)


def test_adding_a_student_adds_only_its_training_cost(benchmark):
    cfg = distill.parse_config(["demo", "--students", "vit_tiny,convnext_test", "--data.batch-size", str(BATCH),
                                "--run.device", "cpu"])
    dist_info = runtime.setup_distributed("cpu")
    torch.manual_seed(0)
    teacher = distill.Teacher(SSLNet(TEACHER, drop_path_rate=0.0), "heads", TEACHER)
    specs = distill.parse_students(cfg.students, world_size=1, global_batch=BATCH)
    vit, convnext = (distill.setup_student(spec, None, teacher, cfg, dist_info) for spec in specs)
    sizes = CropSizes(GLOBAL_SIZE, LOCAL_SIZE)
    loader = build_loader(SampleImagesDataset(), AugmentConfig(n_local_crops=N_LOCAL), sizes, batch_size=BATCH)
    batch = next(iter(loader))
    sched = distill.schedules_at(cfg.optim.lr.warmup_iterations, cfg)  # past warmup and the last-layer freeze

    def share():
        return distill.share_batch(batch, teacher(batch["global_crops"]), 0, 1, dist_info)

    def step(*runs):
        shared = share()
        for run in runs:
            distill.train_student_step(run, teacher, shared, sched, 0, cfg, dist_info)

    shared = share()
    t_teacher = time_call(share)
    t_vit = time_call(lambda: distill.train_student_step(vit, teacher, shared, sched, 0, cfg, dist_info))
    t_convnext = time_call(lambda: distill.train_student_step(convnext, teacher, shared, sched, 0, cfg, dist_info))
    t_one = time_call(lambda: step(vit))
    benchmark.pedantic(step, args=(vit, convnext), rounds=3, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    t_two = stats.stats.min if stats is not None else time_call(lambda: step(vit, convnext))
    assert t_two > t_one > 0

    report(f"distill step cpu b{BATCH} 2x{GLOBAL_SIZE}+{N_LOCAL}x{LOCAL_SIZE}, teacher vit_small",
           teacher_s=t_teacher, student_vit_tiny_s=t_vit, student_convnext_test_s=t_convnext,
           one_student_s=t_one, two_students_s=t_two, added_by_second_s=t_two - t_one,
           separate_runs_s=2 * t_teacher + t_vit + t_convnext, threads=torch.get_num_threads())
