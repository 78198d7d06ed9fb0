/*
 * Entry, descriptor tables and interrupt stubs of the Ferry memtest guest.
 *
 * QEMU's `-kernel` loads this 32-bit multiboot (v1) ELF at 1 MiB and jumps
 * to _start in flat protected mode with EAX = multiboot magic and
 * EBX = physical address of the multiboot information. Paging stays off.
 */

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003       /* page-aligned modules, memory info */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .bss
        .align 16
stack_bottom:
        .skip 16384
stack_top:

        .section .data
        .align 8
gdt:
        .quad 0x0000000000000000        /* null */
        .quad 0x00CF9A000000FFFF        /* 0x08: flat 4 GiB code */
        .quad 0x00CF92000000FFFF        /* 0x10: flat 4 GiB data */
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt

        .section .text
        .global _start
        .type _start, @function
_start:
        cli
        cld
        mov %eax, %esi                  /* keep the multiboot magic */
        lgdt gdt_desc                   /* EBX (multiboot info) untouched */
        ljmp $0x08, $1f
1:      mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %fs
        mov %ax, %gs
        mov %ax, %ss
        mov $__bss_start, %edi          /* zero .bss (holds the stack) */
        mov $__bss_end, %ecx
        sub %edi, %ecx
        xor %eax, %eax
        rep stosb
        mov $stack_top, %esp
        push %ebx
        push %esi
        call kernel_main
halt_forever:
        cli
        hlt
        jmp halt_forever

/* CPU exceptions: push a uniform (vector, error code) frame and report. */
        .macro EXC num, has_err
exc_\num:
        .if \has_err == 0
        pushl $0
        .endif
        pushl $\num
        jmp exc_common
        .endm

        EXC 0,0
        EXC 1,0
        EXC 2,0
        EXC 3,0
        EXC 4,0
        EXC 5,0
        EXC 6,0
        EXC 7,0
        EXC 8,1
        EXC 9,0
        EXC 10,1
        EXC 11,1
        EXC 12,1
        EXC 13,1
        EXC 14,1
        EXC 15,0
        EXC 16,0
        EXC 17,1
        EXC 18,0
        EXC 19,0
        EXC 20,0
        EXC 21,1
        EXC 22,0
        EXC 23,0
        EXC 24,0
        EXC 25,0
        EXC 26,0
        EXC 27,0
        EXC 28,0
        EXC 29,1
        EXC 30,1
        EXC 31,0

exc_common:
        cld
        /* stack: vector, error, eip, cs, eflags = trap_exception's arguments */
        call trap_exception
        jmp halt_forever

/* IRQ0 (PIT, ~1 kHz): count a tick. */
        .global irq_timer
irq_timer:
        pushl %eax
        incl ticks
        movb $0x20, %al
        outb %al, $0x20
        popl %eax
        iret

/* IRQ4 (COM1 receive): drain the UART into the input ring. */
        .global irq_serial
irq_serial:
        pusha
        cld
        call serial_irq
        movb $0x20, %al
        outb %al, $0x20
        popa
        iret

/* Any other (masked or spurious) IRQ: acknowledge and return. */
        .global irq_other
irq_other:
        pushl %eax
        movb $0x20, %al
        outb %al, $0xA0
        outb %al, $0x20
        popl %eax
        iret

        .section .rodata
        .align 4
        .global exc_table
exc_table:
        .long exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
        .long exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
        .long exc_16, exc_17, exc_18, exc_19, exc_20, exc_21, exc_22, exc_23
        .long exc_24, exc_25, exc_26, exc_27, exc_28, exc_29, exc_30, exc_31

        .section .note.GNU-stack, "", @progbits
