package org.faspedge.core

/**
 * A small JSON reader (RFC 8259) for manifests, tokenizer files and runner stats, so that the core
 * module needs nothing but the Kotlin standard library. Objects become [Map] (keys in file order),
 * arrays [List], numbers [Long] when integral and [Double] otherwise, plus [String], [Boolean] and null.
 */
object Json {
    class ParseException(message: String) : Exception(message)

    fun parse(text: String): Any? {
        val p = Parser(text)
        p.skipSpace()
        val value = p.value()
        p.skipSpace()
        if (!p.atEnd()) throw p.error("unexpected text after the JSON value")
        return value
    }

    private class Parser(val s: String) {
        var i = 0

        fun atEnd() = i >= s.length

        fun error(what: String): ParseException {
            val line = s.substring(0, minOf(i, s.length)).count { it == '\n' } + 1
            return ParseException("$what at line $line (offset $i)")
        }

        fun skipSpace() {
            while (i < s.length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++
        }

        fun value(): Any? {
            if (atEnd()) throw error("unexpected end of JSON")
            return when (val c = s[i]) {
                '{' -> obj()
                '[' -> arr()
                '"' -> str()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> if (c == '-' || c.isDigit()) num() else throw error("unexpected character '$c'")
            }
        }

        fun literal(word: String, v: Any?): Any? {
            if (!s.startsWith(word, i)) throw error("expected $word")
            i += word.length
            return v
        }

        fun obj(): Map<String, Any?> {
            val out = LinkedHashMap<String, Any?>()
            i++
            skipSpace()
            if (i < s.length && s[i] == '}') { i++; return out }
            while (true) {
                skipSpace()
                if (atEnd() || s[i] != '"') throw error("expected a string key")
                val key = str()
                skipSpace()
                if (atEnd() || s[i] != ':') throw error("expected ':'")
                i++
                skipSpace()
                out[key] = value()
                skipSpace()
                if (atEnd()) throw error("unterminated object")
                when (s[i]) {
                    ',' -> i++
                    '}' -> { i++; return out }
                    else -> throw error("expected ',' or '}'")
                }
            }
        }

        fun arr(): List<Any?> {
            val out = ArrayList<Any?>()
            i++
            skipSpace()
            if (i < s.length && s[i] == ']') { i++; return out }
            while (true) {
                skipSpace()
                out.add(value())
                skipSpace()
                if (atEnd()) throw error("unterminated array")
                when (s[i]) {
                    ',' -> i++
                    ']' -> { i++; return out }
                    else -> throw error("expected ',' or ']'")
                }
            }
        }

        fun str(): String {
            val sb = StringBuilder()
            i++ // opening quote
            while (true) {
                if (atEnd()) throw error("unterminated string")
                val c = s[i++]
                when {
                    c == '"' -> return sb.toString()
                    c == '\\' -> {
                        if (atEnd()) throw error("unterminated escape")
                        when (val e = s[i++]) {
                            '"' -> sb.append('"'); '\\' -> sb.append('\\'); '/' -> sb.append('/')
                            'b' -> sb.append('\b'); 'f' -> sb.append('\u000C'); 'n' -> sb.append('\n')
                            'r' -> sb.append('\r'); 't' -> sb.append('\t')
                            'u' -> {
                                if (i + 4 > s.length) throw error("short \\u escape")
                                sb.append(s.substring(i, i + 4).toIntOrNull(16)?.toChar() ?: throw error("bad \\u escape"))
                                i += 4
                            }
                            else -> throw error("bad escape '\\$e'")
                        }
                    }
                    c < ' ' -> throw error("control character in string")
                    else -> sb.append(c)
                }
            }
        }

        fun num(): Any {
            val start = i
            if (s[i] == '-') i++
            while (i < s.length && s[i].isDigit()) i++
            var integral = true
            if (i < s.length && s[i] == '.') { integral = false; i++; while (i < s.length && s[i].isDigit()) i++ }
            if (i < s.length && (s[i] == 'e' || s[i] == 'E')) {
                integral = false
                i++
                if (i < s.length && (s[i] == '+' || s[i] == '-')) i++
                while (i < s.length && s[i].isDigit()) i++
            }
            val text = s.substring(start, i)
            if (text == "-" || text.isEmpty()) throw error("bad number")
            return if (integral) text.toLongOrNull() ?: text.toDouble() else text.toDouble()
        }
    }
}

/** Typed access to parsed JSON, with errors that name the path of the missing or mistyped field. */
class JsonView(val value: Any?, val path: String = "$") {
    fun has(key: String): Boolean = (value as? Map<*, *>)?.containsKey(key) == true

    operator fun get(key: String): JsonView {
        val map = value as? Map<*, *> ?: throw Json.ParseException("$path is not an object")
        return JsonView(map[key], "$path.$key")
    }

    fun isNull() = value == null

    fun string(): String = value as? String ?: throw Json.ParseException("$path must be a string")
    fun stringOrNull(): String? = value as? String
    fun long(): Long = (value as? Number)?.toLong() ?: throw Json.ParseException("$path must be a number")
    fun int(): Int = long().toInt()
    fun double(): Double = (value as? Number)?.toDouble() ?: throw Json.ParseException("$path must be a number")
    fun bool(): Boolean = value as? Boolean ?: throw Json.ParseException("$path must be true or false")
    fun list(): List<JsonView> =
        (value as? List<*> ?: throw Json.ParseException("$path must be a list")).mapIndexed { k, v -> JsonView(v, "$path[$k]") }
    fun keys(): List<String> =
        (value as? Map<*, *> ?: throw Json.ParseException("$path is not an object")).keys.map { it.toString() }
}
