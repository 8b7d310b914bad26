package org.faspedge.core

import java.io.File

/**
 * Byte-level BPE (GPT-2 style, as in SmolLM2's and OPT's `tokenizer.json`), for the ONNX path where the
 * app drives generation itself. Special tokens (the tokenizer's added tokens) are matched first; the rest
 * is split with the GPT-2 pattern, mapped byte by byte to printable characters, and merged by rank.
 * Other tokenizer kinds (SentencePiece) are refused with a message: their bundles run on the `.pte` path,
 * whose runner reads `tokenizer.model` natively.
 */
class ByteLevelBpe private constructor(
    private val vocab: Map<String, Int>,
    private val ranks: Map<Pair<String, String>, Int>,
    private val specials: Map<String, Int>,
) {
    private val idToToken: Map<Int, String> = HashMap<Int, String>().also { m ->
        vocab.forEach { (k, v) -> m[v] = k }
        specials.forEach { (k, v) -> m[v] = k }
    }
    private val cache = HashMap<String, List<String>>()
    private val specialPattern: Regex? = if (specials.isEmpty()) null else
        Regex(specials.keys.sortedByDescending { it.length }.joinToString("|") { Regex.escape(it) })

    fun encode(text: String): IntArray {
        val out = ArrayList<Int>()
        var last = 0
        specialPattern?.findAll(text)?.forEach { m ->
            encodeOrdinary(text.substring(last, m.range.first), out)
            out.add(specials.getValue(m.value))
            last = m.range.last + 1
        }
        encodeOrdinary(text.substring(last), out)
        return out.toIntArray()
    }

    fun decode(ids: List<Int>, skipSpecial: Boolean = true): String {
        val bytes = java.io.ByteArrayOutputStream()
        for (id in ids) {
            val tok = idToToken[id] ?: continue
            if (tok in specials) {
                if (!skipSpecial) bytes.write(tok.toByteArray(Charsets.UTF_8))
                continue
            }
            for (ch in tok) {
                val b = UNICODE_TO_BYTE[ch]
                if (b != null) bytes.write(b) else bytes.write(ch.toString().toByteArray(Charsets.UTF_8))
            }
        }
        return bytes.toString(Charsets.UTF_8)
    }

    private fun encodeOrdinary(text: String, out: MutableList<Int>) {
        if (text.isEmpty()) return
        for (m in PATTERN.findAll(text)) {
            val mapped = buildString { for (b in m.value.toByteArray(Charsets.UTF_8)) append(BYTE_TO_UNICODE[b.toInt() and 0xff]) }
            for (piece in bpe(mapped)) {
                out.add(vocab[piece] ?: throw IllegalStateException("token '$piece' is not in the vocabulary"))
            }
        }
    }

    private fun bpe(word: String): List<String> = cache.getOrPut(word) {
        var parts = word.map { it.toString() }
        while (parts.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (i in 0 until parts.size - 1) {
                val r = ranks[parts[i] to parts[i + 1]] ?: continue
                if (r < bestRank) { bestRank = r; best = i }
            }
            if (best < 0) break
            val a = parts[best]
            val b = parts[best + 1]
            val merged = ArrayList<String>(parts.size)
            var i = 0
            while (i < parts.size) {
                if (i < parts.size - 1 && parts[i] == a && parts[i + 1] == b) { merged.add(a + b); i += 2 } else { merged.add(parts[i]); i++ }
            }
            parts = merged
        }
        parts
    }

    companion object {
        /** GPT-2's pre-tokenization pattern (what `ByteLevel` with `use_regex` applies). */
        val PATTERN = Regex("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+")

        /** GPT-2's reversible map from bytes to printable characters. */
        val BYTE_TO_UNICODE: CharArray = CharArray(256).also { table ->
            val direct = (33..126) + (161..172) + (174..255)
            var extra = 0
            for (b in 0 until 256) {
                table[b] = if (b in direct) b.toChar() else (256 + extra++).toChar()
            }
        }
        val UNICODE_TO_BYTE: Map<Char, Int> = BYTE_TO_UNICODE.withIndex().associate { (b, c) -> c to b }

        /** Read a Hugging Face `tokenizer.json`; refuses tokenizers that are not byte-level BPE. */
        fun load(file: File): ByteLevelBpe {
            val root = JsonView(Json.parse(file.readText()))
            val model = root["model"]
            val preText = root["pre_tokenizer"].value.toString()
            if (model["type"].stringOrNull() != "BPE" || "ByteLevel" !in preText) {
                throw BundleException("${file.name} is not a byte-level BPE tokenizer (SentencePiece-style tokenizers " +
                    "run on the .pte path, whose runner reads tokenizer.model); export a .pte for this model")
            }
            val vocab = model["vocab"].let { v -> v.keys().associateWith { v[it].int() } }
            val ranks = HashMap<Pair<String, String>, Int>()
            model["merges"].list().forEachIndexed { rank, m ->
                val pair = if (m.value is String) m.string().split(" ", limit = 2) else m.list().map { it.string() }
                ranks[pair[0] to pair[1]] = rank
            }
            val specials = if (root.has("added_tokens")) {
                root["added_tokens"].list().associate { it["content"].string() to it["id"].int() }
            } else emptyMap()
            return ByteLevelBpe(vocab, ranks, specials)
        }
    }
}
