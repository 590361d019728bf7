//! Incremental Server-Sent Events parser. Network chunks arrive cut at arbitrary places
//! (inside a line, between `\r` and `\n`); this turns them into whole events while never
//! holding more than [`MAX_EVENT_BYTES`] of one line or event, so a hostile or broken
//! upstream cannot make us buffer a 10 MB "line".

/// Largest line, and largest event (all its `data:` lines together), we accept.
pub(crate) const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooLarge;

pub(crate) struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    /// The previous chunk ended in `\r`; a `\n` starting the next chunk belongs to it.
    after_cr: bool,
    limit: usize,
}

impl SseParser {
    pub(crate) fn new() -> SseParser {
        SseParser::with_limit(MAX_EVENT_BYTES)
    }

    pub(crate) fn with_limit(limit: usize) -> SseParser {
        SseParser {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            after_cr: false,
            limit,
        }
    }

    /// Feeds one network chunk; complete events are appended to `out`.
    pub(crate) fn push(
        &mut self,
        mut chunk: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<(), TooLarge> {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.extend_line(&chunk[..pos])?;
            let is_cr = chunk[pos] == b'\r';
            chunk = &chunk[pos + 1..];
            if is_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.finish_line(out)?;
        }
        self.extend_line(chunk)
    }

    /// End of stream: a last line or event without its terminating blank line is still
    /// delivered, since some servers close right after the final `data:` line.
    pub(crate) fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        if !self.line.is_empty() {
            self.finish_line(out)?;
        }
        self.dispatch(out);
        Ok(())
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), TooLarge> {
        if self.line.len() + bytes.len() > self.limit {
            self.line = Vec::new();
            return Err(TooLarge);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn finish_line(&mut self, out: &mut Vec<SseEvent>) -> Result<(), TooLarge> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        if text.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > self.limit {
                    self.data = String::new();
                    return Err(TooLarge);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            // `id`, `retry` and unknown fields carry nothing we use.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if self.has_data {
            self.has_data = false;
            out.push(SseEvent {
                event,
                data: std::mem::take(&mut self.data),
            });
        }
    }

    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.line.capacity() + self.data.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in input.chunks(piece) {
            p.push(c, &mut out).unwrap();
        }
        p.finish(&mut out).unwrap();
        out
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_string),
            data: data.to_string(),
        }
    }

    #[test]
    fn splits_at_every_byte_boundary_give_the_same_events() {
        let input = "event: message_start\r\ndata: {\"a\":1}\r\n\r\n: comment\n\ndata: こんにちは\n\ndata: x\rdata: y\r\r"
            .as_bytes();
        let expected = vec![
            ev(Some("message_start"), "{\"a\":1}"),
            ev(None, "こんにちは"),
            ev(None, "x\ny"),
        ];
        for piece in 1..input.len() {
            assert_eq!(
                parse_in_pieces(input, piece),
                expected,
                "piece size {piece}"
            );
        }
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let out = parse_in_pieces(b": keep-alive\nid: 3\nretry: 10\nfoo\n\ndata:[DONE]\n\n", 7);
        assert_eq!(out, vec![ev(None, "[DONE]")]);
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_does_not_leak() {
        let out = parse_in_pieces(b"event: ping\n\ndata: a\n\n", 3);
        assert_eq!(out, vec![ev(None, "a")]);
    }

    #[test]
    fn last_event_without_blank_line_is_delivered_at_eof() {
        let out = parse_in_pieces(b"data: a\n\ndata: b", 4);
        assert_eq!(out, vec![ev(None, "a"), ev(None, "b")]);
    }

    #[test]
    fn a_10_mb_line_is_refused_without_buffering_it() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let piece = vec![b'a'; 64 * 1024];
        let mut fed = 0usize;
        let mut res = p.push(b"data: ", &mut out);
        while res.is_ok() && fed < 10 * 1024 * 1024 {
            res = p.push(&piece, &mut out);
            fed += piece.len();
            assert!(p.buffered_capacity() <= 2 * MAX_EVENT_BYTES);
        }
        assert_eq!(res, Err(TooLarge));
        assert!(fed <= MAX_EVENT_BYTES + piece.len());
        assert!(out.is_empty());
    }

    #[test]
    fn an_event_of_many_small_lines_is_limited_too() {
        let mut p = SseParser::with_limit(100);
        let mut out = Vec::new();
        let mut res = Ok(());
        for _ in 0..20 {
            res = res.and_then(|_| p.push(b"data: 0123456789\n", &mut out));
        }
        assert_eq!(res, Err(TooLarge));
    }
}
