package org.faspedge.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import java.nio.FloatBuffer
import java.nio.LongBuffer
import org.faspedge.core.Bundle
import org.faspedge.core.Engine
import org.faspedge.core.Plan

/**
 * The bundle's `model.onnx` in ONNX Runtime, as the core's [Engine]: inputs `input_ids [1, T]` and
 * `past_key_values.{i}.key/value`, outputs `logits [1, vocab]` and `present.{i}.key/value` (the bundle
 * contract; per-layer shapes from the manifest, so pruned models work). The cache is the last run's
 * `present` tensors, fed back as the next run's past: layout BNSH ([org.faspedge.core.ONNX_KV_LAYOUT], the
 * manifest's `artifacts.onnx.kv_cache`), `[1, kv_heads, positions, head_dim]` for keys and `v_head_dim` for values.
 * A `--quant 4bit` graph holds ONNX Runtime contrib ops (`MatMulNBits`, `GatherBlockQuantized`), which the
 * onnxruntime-android package runs; its inputs and outputs are the same.
 */
class OnnxEngine(bundle: Bundle, plan: Plan, threads: Int) : Engine {
    private val env = OrtEnvironment.getEnvironment()
    private val session: OrtSession
    private val layers = bundle.manifest.layers
    private var last: OrtSession.Result? = null
    override val maxContext = bundle.manifest.maxContext
    override val vocabSize = bundle.manifest.vocabSize

    init {
        val options = OrtSession.SessionOptions().apply {
            setIntraOpNumThreads(threads)
            setInterOpNumThreads(1)
            setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
        }
        // from the file path, so ONNX Runtime finds model.onnx.data next to it
        session = env.createSession(bundle.file(plan.modelFile).path, options)
    }

    override fun reset() {
        last?.close()
        last = null
    }

    override fun forward(tokens: IntArray, start: Int): FloatArray {
        if (start == 0) reset()
        val previous = last
        check(start == 0 || previous != null) { "decode at position $start without a prefill" }
        val created = ArrayList<OnnxTensor>()
        val inputs = HashMap<String, OnnxTensor>()
        val ids = LongArray(tokens.size) { tokens[it].toLong() }
        inputs["input_ids"] = OnnxTensor.createTensor(env, LongBuffer.wrap(ids), longArrayOf(1, tokens.size.toLong()))
            .also { created.add(it) }
        layers.forEachIndexed { i, d ->
            for ((kind, dim) in listOf("key" to d.headDim, "value" to d.vHeadDim)) {
                inputs["past_key_values.$i.$kind"] = if (previous == null) {
                    OnnxTensor.createTensor(env, FloatBuffer.allocate(0), longArrayOf(1, d.numKvHeads.toLong(), 0, dim.toLong()))
                        .also { created.add(it) }
                } else {
                    previous.get("present.$i.$kind").get() as OnnxTensor
                }
            }
        }
        val result = session.run(inputs)
        created.forEach { it.close() }
        previous?.close()
        last = result
        val logits = (result.get("logits").get() as OnnxTensor).floatBuffer
        return FloatArray(logits.remaining()).also { logits.get(it) }
    }

    override fun close() {
        reset()
        session.close()
    }
}
