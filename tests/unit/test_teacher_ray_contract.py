"""What the teacher's engine actor takes from ``ray.llm._internal`` and from vLLM, checked without Ray running.

raydistill.teacher.engine subclasses ray.data.llm's engine-stage UDF and reuses its internals (why:
see that module's docstring). Nothing in ``_internal`` is a public API, so a Ray upgrade can move or
change any of it. If one of these tests fails after an upgrade, the array path has lost part of the
library's behaviour it relies on: the actor pool and placement groups, per-row errors, the restart of
a dead engine. Fix ``SignalEngineUDF`` / ``apply_signal_engines`` before anything else; the fallback
is our own Ray Data actor class on vLLM's ``AsyncLLM``.
"""

import inspect


def test_the_engine_stage_udf_names_we_use_exist():
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage, vLLMEngineStageUDF, vLLMEngineWrapper
    from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS

    from vllm.v1.engine.exceptions import EngineDeadError

    assert EngineDeadError in tuple(VLLM_FATAL_ERRORS)
    for name in ("_generate_with_error_handling", "normalize_engine_kwargs", "IDX_IN_BATCH_COLUMN", "__call__"):
        assert hasattr(vLLMEngineStageUDF, name), name
    init = inspect.getsource(vLLMEngineStageUDF.__init__)
    # Our __init__ keywords reach the library's through **kwargs; these are the ones it must still take.
    params = inspect.signature(vLLMEngineStageUDF.__init__).parameters
    for name in ("data_column", "expected_input_keys", "model", "engine_kwargs", "should_continue_on_error", "log_engine_metrics"):
        assert name in params, name
    for attr in ("self.engine_kwargs = self.normalize_engine_kwargs(", "self.llm = vLLMEngineWrapper(", "self.should_continue_on_error"):
        assert attr in init, attr
    wrapper = inspect.getsource(vLLMEngineWrapper.__init__)
    for attr in ("self.engine = ", "self.semaphore = ", "self.request_id = 0"):
        assert attr in wrapper, attr
    assert hasattr(vLLMEngineWrapper, "generate_async") and hasattr(vLLMEngineStage, "get_dataset_map_batches_kwargs")


def test_the_per_row_error_path_calls_generate_async_and_exits_on_a_dead_engine():
    """``_generate_with_error_handling`` is where rows become errors (``should_continue_on_error``) and where a
    dead engine exits the actor (``os._exit``) so Ray Data starts a fresh one; our actor relies on both."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

    src = inspect.getsource(vLLMEngineStageUDF._generate_with_error_handling)
    assert "await self.llm.generate_async(row)" in src
    for used in ("request.request_id", "request.idx_in_batch", "request.params", "__inference_error__", "os._exit(1)", "_VLLM_FATAL_ERRORS"):
        assert used in src, used
    assert "self.should_continue_on_error" in src


def test_the_stage_derives_the_pool_and_the_placement_resources():
    """``apply_signal_engines`` applies these ``map_batches`` arguments as they are: the pool, the concurrency and the resources."""
    import ray.data
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage

    def kwargs(tp, bundles):
        stage = vLLMEngineStage(
            fn_constructor_kwargs={"model": "m", "engine_kwargs": {"tensor_parallel_size": tp}, "placement_group_config": {"bundles": bundles},
                                   "batch_size": 4, "max_concurrent_batches": 2},
            map_batches_kwargs={"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=3), "max_concurrency": 2, "runtime_env": {}},
        )
        return stage.get_dataset_map_batches_kwargs(batch_size=4, data_column="__data")

    one = kwargs(1, [{"CPU": 1, "teacher": 1}])
    assert one["num_cpus"] == 1 and one["resources"] == {"teacher": 1} and one["max_concurrency"] == 2 and one["batch_size"] == 4
    assert isinstance(one["compute"], ray.data.ActorPoolStrategy) and one["fn_constructor_kwargs"]["data_column"] == "__data"
    assert "placement_group_config" not in one["fn_constructor_kwargs"]
    two = kwargs(2, [{"GPU": 1}, {"GPU": 1}])  # tensor parallelism: vLLM's Ray executor in a placement group
    assert callable(two["ray_remote_args_fn"]) and two["num_gpus"] == 0
    assert two["fn_constructor_kwargs"]["engine_kwargs"]["distributed_executor_backend"] == "ray"


def test_the_processor_exposes_its_engine_stage_and_config():
    from ray.data.llm import vLLMEngineProcessorConfig
    from ray.llm._internal.batch.processor.base import Processor

    assert Processor.DATA_COLUMN and hasattr(Processor, "get_stage_by_name")
    assert "log_engine_metrics" in vLLMEngineProcessorConfig.model_fields


def test_vllm_fills_flat_logprobs_as_the_array_path_reads_them():
    """Actual token first with its rank, then the top k ranked 1..k; ranks counted with ``>=``; final-only outputs."""
    from vllm import SamplingParams
    from vllm.logprobs import FlatLogprobs, append_logprobs_for_next_position, create_prompt_logprobs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.sample.ops import logprobs as ops

    params = SamplingParams(logprobs=2, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)
    assert params.flat_logprobs and params.output_kind == RequestOutputKind.FINAL_ONLY
    flat = FlatLogprobs()
    append_logprobs_for_next_position(flat, [9, 4, 7], [-3.0, -0.5, -1.0], [None] * 3, 5, 2)
    assert (flat.token_ids, flat.logprobs, flat.ranks, flat.start_indices, flat.end_indices) == ([9, 4, 7], [-3.0, -0.5, -1.0], [5, 1, 2], [0], [3])
    prompt = create_prompt_logprobs(True)
    assert isinstance(prompt, FlatLogprobs) and prompt.start_indices == prompt.end_indices == [0]  # position 0: empty
    # The sampled token's rank counts the log-probs >= its own (a module-level torch.compile'd function: read its source).
    assert "return (x >= values).sum(-1)" in inspect.getsource(ops)


def test_the_single_worker_start_up_uses_what_vllm_still_reads():
    """``single_worker_in_engine_core`` hands vLLM's ``OMPProcessManager`` a stand-in config with only these
    attributes, and relies on the CPU platform keeping ``uni`` when ``VLLM_ENABLE_V1_MULTIPROCESSING`` is 0."""
    from vllm.platforms import cpu
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    src = inspect.getsource(OMPProcessManager.__init__)
    read = {a for a in ("local_world_size", "data_parallel_rank_local", "_api_process_count", "kv_transfer_config") if a in src}
    assert read == {"local_world_size", "data_parallel_rank_local", "_api_process_count", "kv_transfer_config"}
    assert "config." not in src.replace("config.parallel_config.", "").replace("config.kv_transfer_config", "")
    assert hasattr(OMPProcessManager, "configure_omp_envs")
    platform = inspect.getsource(cpu)
    assert 'os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"' in platform
