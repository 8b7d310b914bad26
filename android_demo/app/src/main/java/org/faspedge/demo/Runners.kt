package org.faspedge.demo

import org.faspedge.core.Backend
import org.faspedge.core.Bundle
import org.faspedge.core.ByteLevelBpe
import org.faspedge.core.GenerationStats
import org.faspedge.core.Generator
import org.faspedge.core.Plan
import org.faspedge.core.Sampler
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/** A loaded bundle, ready to generate: ExecuTorch's LlmModule (.pte) or the core's loop over ONNX Runtime. */
interface Runner : AutoCloseable {
    val loadMs: Double

    /** Generate from [prompt]; [onText] gets each new piece of text; returns the stats. Throws on failure. */
    fun generate(prompt: String, maxNewTokens: Int, onText: (String) -> Unit): GenerationStats
    fun stop()
    override fun close() {}

    companion object {
        fun open(bundle: Bundle, plan: Plan, threads: Int): Runner = when (plan.backend) {
            Backend.PTE -> PteRunner(bundle, plan)
            Backend.ONNX -> OnnxRunner(bundle, plan, threads)
        }
    }
}

/** ExecuTorch's LlmModule: tokenization, prefill and decode all in the C++ runner, stats as its JSON. */
class PteRunner(private val bundle: Bundle, plan: Plan) : Runner {
    // the 4-argument constructor (executorch-android 1.x) takes the bundle's .ptd (its weights); null when there is none
    private val module = LlmModule(bundle.file(plan.modelFile).path, bundle.file(plan.tokenizerFile).path, 0.0f,
                                   plan.dataFile?.let { bundle.file(it).path })
    override val loadMs: Double

    init {
        val t0 = System.nanoTime()
        val status = module.load()
        loadMs = (System.nanoTime() - t0) / 1e6
        if (status != 0) throw IllegalStateException("ExecuTorch could not load ${plan.modelFile} (error $status)")
    }

    override fun generate(prompt: String, maxNewTokens: Int, onText: (String) -> Unit): GenerationStats {
        var statsJson: String? = null
        var error: String? = null
        val callback = object : LlmCallback {
            override fun onResult(result: String) = onText(result)
            override fun onStats(stats: String) { statsJson = stats }
            override fun onError(errorCode: Int, message: String) { error = "ExecuTorch error $errorCode: $message" }
        }
        module.resetContext()
        // seqLen counts the prompt too; the runner stops at the bundle's context or an EOS id
        val status = module.generate(prompt, bundle.manifest.maxContext, callback, false)
        error?.let { throw IllegalStateException(it) }
        if (status != 0) throw IllegalStateException("ExecuTorch generate failed (error $status)")
        val stats = GenerationStats.fromRunnerJson(statsJson ?: throw IllegalStateException("the runner reported no stats"))
        return stats.copy(loadMs = loadMs)  // load() ran before the request; the runner's own load figure is 0
    }

    override fun stop() = module.stop()
    override fun close() = module.resetNative()
}

/** ONNX Runtime, driven token by token by the core's [Generator] with the core's tokenizer. */
class OnnxRunner(private val bundle: Bundle, plan: Plan, threads: Int) : Runner {
    private val tokenizer = ByteLevelBpe.load(bundle.file(plan.tokenizerFile))
    private val engine: OnnxEngine
    override val loadMs: Double
    @Volatile private var stopped = false

    init {
        val t0 = System.nanoTime()
        engine = OnnxEngine(bundle, plan, threads)
        loadMs = (System.nanoTime() - t0) / 1e6
    }

    override fun generate(prompt: String, maxNewTokens: Int, onText: (String) -> Unit): GenerationStats {
        stopped = false
        val tok = bundle.manifest.tokenizer
        val ids = (if (tok.addBos && tok.bosId != null) intArrayOf(tok.bosId!!) else IntArray(0)) + tokenizer.encode(prompt)
        val out = ArrayList<Int>()
        var shown = ""
        val result = Generator.generate(engine, ids, maxNewTokens, tok.eosIds.toSet(), Sampler(), loadMs) { t ->
            out.add(t)
            val text = tokenizer.decode(out)
            if (text.length > shown.length && !text.endsWith('\uFFFD')) {  // wait for a whole UTF-8 character
                onText(text.substring(shown.length))
                shown = text
            }
            !stopped
        }
        return result.stats
    }

    override fun stop() { stopped = true }
    override fun close() = engine.close()
}
