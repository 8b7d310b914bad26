package org.faspedge.core

import java.io.File
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertTrue

class JsonTest {
    @Test fun parsesEveryKind() {
        val v = JsonView(Json.parse("""{"a": [1, -2.5e1, true, false, null], "s": "q\"\\\u00e9\n\ud83d\ude00", "o": {}}"""))
        assertEquals(1L, v["a"].list()[0].value)
        assertEquals(-25.0, v["a"].list()[1].double())
        assertEquals(listOf(true, false, null), v["a"].list().drop(2).map { it.value })
        assertEquals("q\"\\é\n😀", v["s"].string())
        assertEquals(emptyList(), v["o"].keys())
    }

    @Test fun errorsSayWhere() {
        val e = assertFailsWith<Json.ParseException> { Json.parse("{\n\"a\": [1,\n}") }
        assertTrue("line 3" in e.message!!, e.message)
        assertFailsWith<Json.ParseException> { Json.parse("{} x") }
        val missing = assertFailsWith<Json.ParseException> { JsonView(Json.parse("{\"a\": {}}"))["a"]["b"].string() }
        assertTrue("$.a.b" in missing.message!!, missing.message)
    }
}

class BundleTest {
    private val expect get() = Fixtures.data["manifest"]

    @Test fun readsTheExportersRealManifest() {
        val b = Bundle.open(Fixtures.bundle)
        val m = b.manifest
        assertEquals(expect["format_version"].int(), m.formatVersion)
        assertEquals(expect["formats"].list().map { it.string() }.toSet(), m.artifacts.keys)
        assertEquals(expect["max_context"].int(), m.maxContext)
        assertEquals(expect["quantization"].string(), m.quantization)
        assertEquals(expect["eos_ids"].list().map { it.int() }, m.tokenizer.eosIds)
        assertEquals(expect["runner_tokenizer"].string(), m.tokenizer.runnerTokenizer)
        assertEquals(expect["files"].list().map { it.string() }.toSet(), m.files.keys)
        assertEquals(expect["parameters"].long(), m.parameters)
        assertEquals(expect["v_head_dims"].list().map { it.int() }, m.layers.map { it.vHeadDim })
        assertEquals(ONNX_KV_LAYOUT, m.artifacts["onnx"]!!.kvCache)  // the exporter records the layout the engine feeds
        assertEquals(null, m.artifacts["pte"]!!.kvCache)
        assertTrue(m.describe().contains("context ${m.maxContext}"), m.describe())
    }

    @Test fun damagedCopyIsRejectedByItsHash() {
        val e = assertFailsWith<BundleException> { Bundle.open(Fixtures.damagedBundle) }
        assertTrue("does not match its sha256" in e.message!! && "push it again" in e.message!!, e.message)
    }

    @Test fun folderWithoutManifest() {
        val dir = File(Fixtures.scratch, "empty").apply { mkdirs() }
        val e = assertFailsWith<BundleException> { Bundle.open(dir) }
        assertTrue("no manifest.json" in e.message!! && "fasp-edge export" in e.message!!, e.message)
    }

    @Test fun newerFormatVersionIsRefused() {
        val dir = copyOfBundle("newer")
        val mf = File(dir, "manifest.json")
        mf.writeText(mf.readText().replace(Regex("\"format_version\": *\\d+"), "\"format_version\": 99"))
        val e = assertFailsWith<BundleException> { Bundle.open(dir) }
        assertTrue("format version 99" in e.message!! && "update the app" in e.message!!, e.message)
    }

    @Test fun missingTokenizerIsNamed() {
        val dir = copyOfBundle("no-tokenizer")
        val tok = Bundle.open(dir).manifest.tokenizer.runnerTokenizer!!
        File(dir, tok).delete()
        val e = assertFailsWith<BundleException> { Bundle.open(dir) }
        assertTrue("$tok is missing" in e.message!!, e.message)
    }

    @Test fun garbageManifestIsAClearError() {
        val dir = File(Fixtures.scratch, "garbage").apply { mkdirs() }
        File(dir, "manifest.json").writeText("{not json")
        val e = assertFailsWith<BundleException> { Bundle.open(dir) }
        assertTrue("not valid JSON" in e.message!!, e.message)
    }
}

fun copyOfBundle(name: String): File {
    val dir = File(Fixtures.scratch, name)
    Fixtures.bundle.copyRecursively(dir, overwrite = true)
    return dir
}

class BackendTest {
    @Test fun choosesPteWithTheRunnerTokenizer() {
        val b = Bundle.open(Fixtures.bundle)
        val plan = Backends.choose(b)
        assertEquals(Backend.PTE, plan.backend)
        assertEquals(b.manifest.tokenizer.runnerTokenizer, plan.tokenizerFile)
        assertEquals("model.ptd", plan.dataFile)  // a .pte keeps its weights in the .ptd LlmModule is given
        assertEquals(Backend.ONNX, Backends.choose(b, Backend.ONNX).backend)  // the bundle has both formats
        assertEquals(null, Backends.choose(b, Backend.ONNX).dataFile)
    }

    /** A bundle of `fasp-edge export --quant 4bit` (ONNX only): the ONNX engine runs it, ExecuTorch does not. */
    private fun fourBitBundle(name: String, layout: String = ONNX_KV_LAYOUT): File {
        val dir = copyOfBundle(name)
        val mf = File(dir, "manifest.json")
        mf.writeText(mf.readText().replace(Regex("\"quantization\": *\"none\""), "\"quantization\": \"4bit\"")
            .replace(Regex("\"layout\": *\"$ONNX_KV_LAYOUT\""), "\"layout\": \"$layout\""))
        return dir
    }

    @Test fun runsA4bitOnnxBundleOnOnnxRuntime() {
        val b = Bundle.open(fourBitBundle("onnx-4bit"))
        assertEquals("4bit", b.manifest.quantization)
        assertEquals(listOf(Backend.ONNX), Backends.usable(b).map { it.backend })
        assertEquals(Backend.ONNX, Backends.choose(b, Backend.PTE).backend)
        assertEquals(b.manifest.tokenizer.hfTokenizer, Backends.choose(b).tokenizerFile)
    }

    @Test fun refusesAKvCacheLayoutItDoesNotFeed() {
        val b = Bundle.open(fourBitBundle("onnx-bsnh", layout = "BSNH"))
        assertEquals(emptyList(), Backends.usable(b))
        val e = assertFailsWith<BundleException> { Backends.choose(b) }
        assertTrue("KV-cache layout 'BSNH'" in e.message!! && "($ONNX_KV_LAYOUT)" in e.message!!, e.message)
    }

    @Test fun saysWhyNothingRuns() {
        val dir = copyOfBundle("no-runner-tokenizer")
        val mf = File(dir, "manifest.json")
        mf.writeText(mf.readText().replace(Regex("\"runner_tokenizer\": *\"[^\"]*\""), "\"runner_tokenizer\": null")
            .replace(Regex("\"hf_tokenizer\": *\"[^\"]*\""), "\"hf_tokenizer\": null"))
        val e = assertFailsWith<BundleException> { Backends.choose(Bundle.open(dir)) }
        assertTrue("no tokenizer file ExecuTorch's runner can read" in e.message!!, e.message)
    }
}

class StatsTest {
    @Test fun parsesTheRunnersOwnStats() {
        val runner = Fixtures.data["runner"]
        val s = GenerationStats.fromRunnerJson(runner["stats_json"].string())
        assertEquals(runner["generated_tokens"].int(), s.generatedTokens)
        assertEquals(runner["prompt_tokens"].int(), s.promptTokens)
        assertTrue(s.ttftMs >= 0 && s.loadMs >= 0 && s.decodeMs >= 0, s.toString())
        assertTrue(s.format().startsWith("load "), s.format())
    }

    @Test fun fieldNamesAreTheRunners() {
        val names = Fixtures.data["runner"]["field_names"].list().map { it.string() }.toSet()
        assertTrue(names.containsAll(GenerationStats.RUNNER_FIELDS), "runner fields: $names")
        val e = assertFailsWith<IllegalArgumentException> { GenerationStats.fromRunnerJson("{\"prompt_tokens\": 3}") }
        assertTrue("model_load_start_ms" in e.message!!, e.message)
    }

    @Test fun formatsLikeTheHost() {
        val s = GenerationStats(loadMs = 412.0, ttftMs = 98.4, promptTokens = 64, generatedTokens = 64, decodeMs = 1500.0)
        assertEquals(42.0, s.decodeTokensPerSecond, 1e-9)
        assertEquals("load 412 ms · TTFT 98 ms (64 prompt tokens) · 42.0 tokens/s (64 tokens)", s.format())
    }
}

class PromptTest {
    @Test fun chatMlAsTheTemplateRendersIt() {
        val c = Fixtures.data["chat"]
        val f = PromptFormatter.fromTemplate(c["template"].string())
        assertEquals(PromptFormatter.Style.CHATML, f.style)
        assertEquals(c["rendered"].string(), f.format(c["user"].string()))
    }

    @Test fun plainWithoutTemplate() {
        assertEquals("hello", PromptFormatter.fromTemplate(null).format("hello"))
        assertEquals(PromptFormatter.Style.PLAIN, PromptFormatter.forBundle(Bundle.open(Fixtures.bundle)).style)
    }
}

class TokenizerTest {
    @Test fun encodesLikeHuggingFace() {
        val t = Fixtures.data["tokenizer"]
        val bpe = ByteLevelBpe.load(File(t["file"].string()))
        for (case in t["cases"].list()) {
            val text = case["text"].string()
            val want = case["ids"].list().map { it.int() }
            assertEquals(want, bpe.encode(text).toList(), "encoding of '$text'")
            assertEquals(case["decoded"].string(), bpe.decode(want), "decoding of '$text'")
        }
    }

    @Test fun refusesSentencePiece() {
        val b = Bundle.open(Fixtures.bundle)  // stories260K: a Metaspace (SentencePiece-style) tokenizer.json
        val e = assertFailsWith<BundleException> { ByteLevelBpe.load(b.file("tokenizer.json")) }
        assertTrue("not a byte-level BPE tokenizer" in e.message!!, e.message)
    }
}

/** Next token = last + 1 (mod vocab), as logits; counts the positions it was given. */
class CountingEngine(override val maxContext: Int = 16, override val vocabSize: Int = 10) : Engine {
    val calls = ArrayList<Pair<Int, Int>>()
    override fun forward(tokens: IntArray, start: Int): FloatArray {
        calls.add(start to tokens.size)
        return FloatArray(vocabSize).also { it[(tokens.last() + 1) % vocabSize] = 5f }
    }
    override fun reset() { calls.clear() }
}

class GeneratorTest {
    @Test fun greedyStopsAtEosAndFeedsPositions() {
        val e = CountingEngine()
        val r = Generator.generate(e, intArrayOf(1, 2), maxNewTokens = 10, eosIds = setOf(6))
        assertEquals(listOf(3, 4, 5), r.tokens)
        assertTrue(r.stoppedAtEos)
        assertEquals(listOf(0 to 2, 2 to 1, 3 to 1, 4 to 1), e.calls)  // prefill, then one position at a time
    }

    @Test fun stopsAtMaxTokensAndContext() {
        assertEquals(4, Generator.generate(CountingEngine(), intArrayOf(0), 4, emptySet()).tokens.size)
        val ctx = Generator.generate(CountingEngine(maxContext = 5), intArrayOf(0, 1), 100, emptySet())
        assertEquals(4, ctx.tokens.size)  // positions 2, 3, 4 fed back; the last token is emitted, not fed
        val e = assertFailsWith<IllegalArgumentException> { Generator.generate(CountingEngine(maxContext = 3), IntArray(3), 1, emptySet()) }
        assertTrue("--max-context" in e.message!!, e.message)
    }

    @Test fun statsFromTheClock() {
        var now = 0L
        val clock = { now.also { now += 10_000_000 } }  // every reading 10 ms later
        val r = Generator.generate(CountingEngine(), intArrayOf(1), 3, emptySet(), loadMs = 7.0, clock = clock)
        assertEquals(7.0, r.stats.loadMs)
        assertEquals(10.0, r.stats.ttftMs)
        assertEquals(3, r.stats.generatedTokens)
        assertEquals(1, r.stats.promptTokens)
    }

    @Test fun samplingIsSeeded() {
        val logits = FloatArray(50) { (it % 7).toFloat() }
        val a = List(20) { Sampler(1.0, 10, seed = 3) }.map { it.pick(logits) }
        val s1 = Sampler(1.0, 10, seed = 3)
        val s2 = Sampler(1.0, 10, seed = 3)
        assertEquals(List(20) { s1.pick(logits) }, List(20) { s2.pick(logits) })
        assertTrue(a.all { logits[it] >= 5f })  // top-10 only: values 5 and 6
        assertEquals(Sampler.argmax(logits), Sampler().pick(logits))
    }
}
