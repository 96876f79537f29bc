//! The protocol's numbers, by name: the codes that take the place of a
//! protocol version in a startup packet, the tags of the messages the proxy
//! reads or writes (by direction: `S` is Sync from a client but
//! ParameterStatus from a server), ErrorResponse fields and the
//! Authentication codes.

/// Protocol 3.0, in a StartupMessage.
pub(crate) const PROTOCOL_3: u32 = 196_608;
pub(crate) const SSL_REQUEST: u32 = 80_877_103;
pub(crate) const GSSENC_REQUEST: u32 = 80_877_104;
pub(crate) const CANCEL_REQUEST: u32 = 80_877_102;

/// What clients send.
pub(crate) mod frontend {
    pub(crate) const QUERY: u8 = b'Q';
    pub(crate) const PARSE: u8 = b'P';
    pub(crate) const BIND: u8 = b'B';
    pub(crate) const DESCRIBE: u8 = b'D';
    pub(crate) const CLOSE: u8 = b'C';
    pub(crate) const SYNC: u8 = b'S';
    pub(crate) const EXECUTE: u8 = b'E';
    pub(crate) const TERMINATE: u8 = b'X';
    /// SASLInitialResponse and SASLResponse alike.
    pub(crate) const SASL_RESPONSE: u8 = b'p';
    /// In Close and Describe: the name is a prepared statement's (not a portal's).
    pub(crate) const STATEMENT: u8 = b'S';
    /// In Close and Describe: the name is a portal's.
    pub(crate) const PORTAL: u8 = b'P';
}

/// What servers send.
pub(crate) mod backend {
    pub(crate) const AUTHENTICATION: u8 = b'R';
    pub(crate) const BACKEND_KEY_DATA: u8 = b'K';
    pub(crate) const PARAMETER_STATUS: u8 = b'S';
    pub(crate) const READY_FOR_QUERY: u8 = b'Z';
    pub(crate) const ERROR_RESPONSE: u8 = b'E';
    pub(crate) const PARSE_COMPLETE: u8 = b'1';
    pub(crate) const CLOSE_COMPLETE: u8 = b'3';
    pub(crate) const ROW_DESCRIPTION: u8 = b'T';
    pub(crate) const NO_DATA: u8 = b'n';
    pub(crate) const DATA_ROW: u8 = b'D';
    pub(crate) const COMMAND_COMPLETE: u8 = b'C';
    pub(crate) const EMPTY_QUERY: u8 = b'I';
    /// ReadyForQuery's status outside a transaction block.
    pub(crate) const IDLE: u8 = b'I';
}

/// Fields of an ErrorResponse.
pub(crate) mod error_field {
    pub(crate) const SEVERITY: u8 = b'S';
    /// The severity, never translated.
    pub(crate) const SEVERITY_V: u8 = b'V';
    pub(crate) const CODE: u8 = b'C';
    pub(crate) const MESSAGE: u8 = b'M';
}

/// What an Authentication message asks for or says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthCode {
    Ok,
    CleartextPassword,
    /// AuthenticationSASL: the mechanisms follow.
    Sasl,
    SaslContinue,
    SaslFinal,
    /// Any method the proxy does not speak.
    Other(u32),
}

impl AuthCode {
    pub(crate) fn code(self) -> u32 {
        match self {
            AuthCode::Ok => 0,
            AuthCode::CleartextPassword => 3,
            AuthCode::Sasl => 10,
            AuthCode::SaslContinue => 11,
            AuthCode::SaslFinal => 12,
            AuthCode::Other(code) => code,
        }
    }

    pub(crate) fn from_code(code: u32) -> AuthCode {
        match code {
            0 => AuthCode::Ok,
            3 => AuthCode::CleartextPassword,
            10 => AuthCode::Sasl,
            11 => AuthCode::SaslContinue,
            12 => AuthCode::SaslFinal,
            other => AuthCode::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_codes_round_trip() {
        for code in [0, 3, 5, 10, 11, 12, 99] {
            assert_eq!(AuthCode::from_code(code).code(), code);
        }
        assert_eq!(AuthCode::from_code(10), AuthCode::Sasl);
    }
}
