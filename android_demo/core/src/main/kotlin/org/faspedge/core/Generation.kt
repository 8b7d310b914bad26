package org.faspedge.core

import kotlin.math.exp

/**
 * A model the core's generation loop drives (the app's ONNX Runtime session; fakes in tests). The
 * engine keeps the KV cache: [forward] runs [tokens] at positions `start ..< start + tokens.size`, after
 * the `start` positions already cached, and returns the logits of the last position.
 */
interface Engine : AutoCloseable {
    val maxContext: Int
    val vocabSize: Int
    fun forward(tokens: IntArray, start: Int): FloatArray
    fun reset()
    override fun close() {}
}

/** Greedy when [temperature] is 0; else softmax sampling at [temperature] over the [topK] best (0: all), seeded. */
class Sampler(val temperature: Double = 0.0, val topK: Int = 0, seed: Long = 0) {
    private val random = java.util.Random(seed)

    init {
        require(temperature >= 0) { "temperature must be >= 0" }
        require(topK >= 0) { "top-k must be >= 0" }
    }

    fun pick(logits: FloatArray): Int {
        if (temperature == 0.0) return argmax(logits)
        var order = logits.indices.sortedByDescending { logits[it] }
        if (topK in 1 until order.size) order = order.subList(0, topK)
        val top = logits[order[0]]
        val weights = DoubleArray(order.size) { exp((logits[order[it]] - top) / temperature) }
        var r = random.nextDouble() * weights.sum()
        for (i in weights.indices) {
            r -= weights[i]
            if (r <= 0) return order[i]
        }
        return order.last()
    }

    companion object {
        fun argmax(x: FloatArray): Int {
            var best = 0
            for (i in 1 until x.size) if (x[i] > x[best]) best = i
            return best
        }
    }
}

data class GenerationResult(val tokens: List<Int>, val stoppedAtEos: Boolean, val stats: GenerationStats)

object Generator {
    /**
     * Prefill [prompt], then decode up to [maxNewTokens] tokens, stopping at an id in [eosIds] (not
     * emitted), at the engine's context limit, or when [onToken] returns false. [loadMs] is how long the
     * engine took to load, carried into the stats. [clock] gives nanoseconds.
     */
    fun generate(
        engine: Engine, prompt: IntArray, maxNewTokens: Int, eosIds: Set<Int>, sampler: Sampler = Sampler(),
        loadMs: Double = 0.0, clock: () -> Long = System::nanoTime, onToken: (Int) -> Boolean = { true },
    ): GenerationResult {
        require(prompt.isNotEmpty()) { "the prompt is empty" }
        require(maxNewTokens >= 1) { "max new tokens must be >= 1" }
        if (prompt.size >= engine.maxContext) {
            throw IllegalArgumentException("the prompt has ${prompt.size} tokens; this bundle holds ${engine.maxContext} " +
                "in all (export it with a larger --max-context, or shorten the prompt)")
        }
        engine.reset()
        val t0 = clock()
        var logits = engine.forward(prompt, 0)
        var pos = prompt.size
        val out = ArrayList<Int>()
        var firstAt = 0L
        var eos = false
        while (out.size < maxNewTokens) {
            val tok = sampler.pick(logits)
            if (out.isEmpty()) firstAt = clock()
            if (tok in eosIds) { eos = true; break }
            out.add(tok)
            if (!onToken(tok) || pos >= engine.maxContext || out.size == maxNewTokens) break
            logits = engine.forward(intArrayOf(tok), pos)
            pos++
        }
        val end = clock()
        val stats = GenerationStats(loadMs = loadMs, ttftMs = (firstAt - t0) / 1e6, promptTokens = prompt.size,
            generatedTokens = out.size, decodeMs = (end - firstAt) / 1e6)
        return GenerationResult(out, eos, stats)
    }
}
