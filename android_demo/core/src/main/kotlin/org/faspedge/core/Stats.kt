package org.faspedge.core

/**
 * The figures the app shows after a generation, defined as `fasp-edge bench` defines them on the host:
 * load = reading the model; TTFT = from the start of the request to the first generated token (prompt
 * tokenization, prefill and the first sampling); decode tokens/s = the tokens after the first, over the
 * time after the first token; prefill tokens/s = prompt tokens over TTFT.
 */
data class GenerationStats(
    val loadMs: Double,
    val ttftMs: Double,
    val promptTokens: Int,
    val generatedTokens: Int,
    val decodeMs: Double,
) {
    val decodeTokensPerSecond: Double
        get() = if (generatedTokens > 1 && decodeMs > 0) (generatedTokens - 1) * 1000.0 / decodeMs else Double.NaN

    val prefillTokensPerSecond: Double
        get() = if (ttftMs > 0) promptTokens * 1000.0 / ttftMs else Double.NaN

    /** One line for the screen, e.g. "load 412 ms · TTFT 98 ms (64 prompt tokens) · 41.8 tokens/s (63 tokens)". */
    fun format(): String {
        val rate = if (decodeTokensPerSecond.isNaN()) "– tokens/s" else String.format("%.1f tokens/s", decodeTokensPerSecond)
        return String.format("load %.0f ms · TTFT %.0f ms (%d prompt tokens) · %s (%d tokens)",
            loadMs, ttftMs, promptTokens, rate, generatedTokens)
    }

    companion object {
        /** The field names of the stats JSON ExecuTorch's LLM runner reports (TextLLMRunner, Android LlmModule.onStats). */
        val RUNNER_FIELDS = listOf(
            "model_load_start_ms", "model_load_end_ms", "inference_start_ms", "first_token_ms",
            "inference_end_ms", "prompt_tokens", "generated_tokens", "SCALING_FACTOR_UNITS_PER_SECOND",
        )

        /** Stats from ExecuTorch's runner JSON; missing or mistyped fields are an error naming the field. */
        fun fromRunnerJson(text: String): GenerationStats {
            val root = try {
                JsonView(Json.parse(text))
            } catch (e: Json.ParseException) {
                throw IllegalArgumentException("the runner's stats are not JSON (${e.message})")
            }
            for (f in RUNNER_FIELDS) require(root.has(f)) { "the runner's stats have no '$f' field" }
            val unitsPerSecond = root["SCALING_FACTOR_UNITS_PER_SECOND"].double()
            val toMs = 1000.0 / unitsPerSecond
            fun at(k: String) = root[k].double()
            return GenerationStats(
                loadMs = (at("model_load_end_ms") - at("model_load_start_ms")) * toMs,
                ttftMs = (at("first_token_ms") - at("inference_start_ms")) * toMs,
                promptTokens = root["prompt_tokens"].int(),
                generatedTokens = root["generated_tokens"].int(),
                decodeMs = (at("inference_end_ms") - at("first_token_ms")) * toMs,
            )
        }
    }
}
